"""Inference strategies: pick one answer out of N sampled trajectories.

``greedy`` takes the single (first) trajectory; ``majority`` the most common final answer
(grouped by mathematical equivalence); ``best-of-n`` the trajectory a scorer (an outcome reward
model) rates highest; ``weighted-majority`` sums scorer ratings per answer, as Qwen2.5-Math's
RM-weighted voting does. A scorer is anything with ``score(trajectories) -> list[float]``: the
trained RM (``tirforge.training.rm.RewardScorer``), the step-level value model
(``tirforge.training.value.ValueScorer``, made for partial trajectories) or
``ExecutionScorer`` below, which needs no model. ``step-search`` is not a choice among
finished samples but a search while solving (``tirforge.agent.search.step_search``): the
scorer rates partial trajectories after every turn.

``solve_with(strategy, ...)`` runs one problem by any of them, starting the kernels it needs:
one streamed run (greedy), N concurrent samples then ``choose`` (the sampling strategies), or
step search; ``tirforge solve`` renders its result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from tirforge.trajectories.metrics import group_answers
from tirforge.trajectories.schema import Trajectory

Strategy = Literal["greedy", "majority", "best-of-n", "weighted-majority"]
STRATEGIES: tuple[str, ...] = ("greedy", "majority", "best-of-n", "weighted-majority")
"""What ``choose`` accepts: ways to pick one of N finished trajectories."""
SOLVE_STRATEGIES: tuple[str, ...] = (*STRATEGIES, "step-search")
"""Everything ``tirforge solve --strategy`` accepts: ``choose``'s strategies and step search."""
SCORED_STRATEGIES: tuple[str, ...] = ("best-of-n", "weighted-majority", "step-search")
"""Strategies that need a scorer."""


class ScorerRequired(ValueError):
    """A strategy that rates trajectories (``SCORED_STRATEGIES``) was called without a scorer.
    ``strategy`` names it; a face maps it to its own spelling (``tirforge solve``: ``--rm``)."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        super().__init__(f"strategy {strategy!r} needs a scorer: pass scorer=, an object with "
                         "score(trajectories) -> list[float] (ExecutionScorer(), a RewardScorer "
                         "or a ValueScorer)")


class Scorer(Protocol):
    """Rates whole (or partial) trajectories: higher means more likely correct."""

    def score(self, trajectories: list[Trajectory]) -> list[float]: ...


class ExecutionScorer:
    """A model-free scorer: an answer, code that ran cleanly and few self-corrections score
    higher. A weak signal, but a real one for TIR (failed cells predict wrong answers)."""

    def score(self, trajectories: list[Trajectory]) -> list[float]:
        out = []
        for t in trajectories:
            runs = [s.execution for s in t.steps if s.execution is not None]
            ok = sum(r.ok for r in runs)
            s = (1.0 if t.final_answer else 0.0) + 0.5 * (ok / len(runs) if runs else 0.0)
            out.append(s - 0.1 * sum(1 for st in t.steps if st.feedback))
        return out


def choose(
    trajectories: Sequence[Trajectory], strategy: str = "greedy", scorer: Scorer | None = None
) -> Trajectory:
    """The trajectory whose answer ``strategy`` picks; ties go to the earliest sample. Raises
    ValueError for no trajectories or an unknown strategy, ``ScorerRequired`` for
    ``best-of-n`` / ``weighted-majority`` without ``scorer``."""
    if not trajectories:
        raise ValueError("no trajectories to choose from")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    trajs = list(trajectories)
    if strategy == "greedy" or len(trajs) == 1:
        return trajs[0]
    scores: list[float] | None = None
    if strategy in ("best-of-n", "weighted-majority"):
        if scorer is None:
            raise ScorerRequired(strategy)
        scores = scorer.score(trajs)
        for t, s in zip(trajs, scores, strict=True):
            t.score = s
    if strategy == "best-of-n":
        assert scores is not None
        return trajs[max(range(len(trajs)), key=lambda i: (scores[i], -i))]
    groups = group_answers([t.final_answer for t in trajs])
    weights = scores if scores is not None else [1.0] * len(trajs)
    totals: dict[int, float] = {}
    for g, w in zip(groups, weights, strict=True):
        if g >= 0:
            totals[g] = totals.get(g, 0.0) + w
    if not totals:  # nobody answered: fall back to the first sample
        return trajs[0]
    best = max(totals, key=lambda g: (totals[g], -g))
    return trajs[groups.index(best)]


def summarize_answers(trajectories: Sequence[Trajectory]) -> str:
    """One line of the answers and how often each came up, equivalent spellings grouped, most
    common first: ``"18 ×3, 20 ×1, (none) ×1"``."""
    groups = group_answers([t.final_answer for t in trajectories])
    counts: dict[int, int] = {}
    first: dict[int, str] = {}
    for t, g in zip(trajectories, groups, strict=True):
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, "(none)" if g < 0 else str(t.final_answer))
    order = sorted(counts, key=lambda g: (g < 0, -counts[g], g))
    return ", ".join(f"{first[g]} ×{counts[g]}" for g in order)


# --------------------------------------------------------------------------- solving


@dataclass
class SolveResult:
    """What ``solve_with`` returns."""

    trajectory: Trajectory
    """The chosen (greedy: the only) trajectory."""
    candidates: list[Trajectory] = field(default_factory=list)
    """The N samples behind a choice, or step search's finished candidates (greedy: none)."""
    note: str = ""
    """How the search went (step-search: steps and continuations)."""


class ExecutorUnavailable(RuntimeError):
    """The kernels could not start (no Docker daemon, no image, no bwrap ...)."""


Event = Callable[[str, Any], None]
"""(node, state update or ``("event", AgentEvent)``) as the greedy run streams."""

SAMPLING_TEMPERATURE = 0.7
"""A sampling strategy's temperature when the agent's is 0: N greedy samples are one."""


def solve_with(
    strategy: str,
    problem: str,
    backend: Any,
    agent_cfg: Any,
    executor_cfg: Any,
    *,
    n: int = 4,
    beam: int = 2,
    scorer: Scorer | None = None,
    reference: str | None = None,
    model_name: str = "",
    session_db: str | Path | None = None,
    thread_id: str | None = None,
    on_event: Event | None = None,
    on_search_step: Callable[[int, list[Trajectory]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> SolveResult:
    """Solve ``problem`` by ``strategy`` (one of ``SOLVE_STRATEGIES``).

    ``greedy``: one run on one kernel, streamed to ``on_event``; with ``session_db`` (SQLite)
    every step is checkpointed under ``thread_id`` (default ``default``) and a second call
    resumes it. ``majority`` / ``best-of-n`` / ``weighted-majority``: ``n`` samples run
    concurrently on a pool of up to 8 kernels, then ``choose`` picks one. ``step-search``: beam
    ``beam`` x ``n`` continuations per step on one kernel (``agent.search.step_search``). Non-
    greedy strategies sample at ``SAMPLING_TEMPERATURE`` when the agent's temperature is 0.
    ``on_status`` gets a short line as the phase changes. Raises ValueError for an unknown
    strategy, n or beam < 1 or a session with a non-greedy strategy;
    ``ScorerRequired`` (a ValueError) for a scored strategy without ``scorer``;
    ``ExecutorUnavailable`` when kernels cannot start.
    """
    if strategy not in SOLVE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                         f"{', '.join(SOLVE_STRATEGIES)}")
    if n < 1 or beam < 1:
        raise ValueError("n and beam must be at least 1")
    if strategy != "greedy" and session_db is not None:
        raise ValueError("a session (session_db) resumes a single run: use the greedy strategy")
    if strategy in SCORED_STRATEGIES and scorer is None:
        raise ScorerRequired(strategy)
    status = on_status or (lambda _: None)
    if strategy != "greedy" and agent_cfg.sampling.temperature == 0:
        agent_cfg = replace(agent_cfg, sampling=replace(
            agent_cfg.sampling, temperature=SAMPLING_TEMPERATURE))
    tools = agent_cfg.fmt.uses_tools
    with contextlib.ExitStack() as stack:
        if strategy in ("greedy", "step-search"):
            kernel = _start_kernel(stack, executor_cfg, status) if tools else None
            if strategy == "greedy":
                return _greedy(problem, backend, kernel, agent_cfg, reference, model_name,
                               stack, session_db, thread_id, on_event, status)
            from tirforge.agent.search import StepSearchConfig, step_search

            status(f"searching (beam {beam}, {n} continuations per step) ...")
            res = step_search(problem, backend, kernel, scorer,  # type: ignore[arg-type]
                              StepSearchConfig(beam_width=beam, expansions_per_step=n,
                                               agent=agent_cfg),
                              reference=reference, model_name=model_name, on_step=on_search_step)
            return SolveResult(res.best, res.finished,
                               f"{res.steps} steps, {res.expansions} continuations")
        from tirforge.agent.runner import RunnerConfig, run_many

        pool = _start_pool(stack, executor_cfg, min(n, 8), status) if tools else None
        status(f"sampling {n} solutions ...")
        samples = run_many([{"problem": problem, "reference": reference}], backend, pool,
                           agent_cfg, RunnerConfig(samples=n, max_concurrency=n),
                           model_name=model_name)
        return SolveResult(choose(samples, strategy, scorer), samples)
    raise AssertionError("unreachable")  # pragma: no cover - every branch returns


def _start_kernel(stack: contextlib.ExitStack, executor_cfg: Any,
                  status: Callable[[str], None]) -> Any:
    from tirforge.executors import make_executor

    status(f"starting a {executor_cfg.backend} kernel ...")
    try:
        kernel = make_executor(executor_cfg)
        kernel.start()
    except Exception as e:  # no Docker daemon, no image, no bwrap: the message says how to fix
        raise ExecutorUnavailable(f"could not start the {executor_cfg.backend} executor: {e}"
                                  ) from e
    return stack.enter_context(kernel)


def _start_pool(stack: contextlib.ExitStack, executor_cfg: Any, size: int,
                status: Callable[[str], None]) -> Any:
    from tirforge.executors import KernelPool

    status(f"starting {size} {executor_cfg.backend} kernels ...")
    try:
        return stack.enter_context(KernelPool(executor_cfg, size=size))
    except Exception as e:
        raise ExecutorUnavailable(f"could not start the {executor_cfg.backend} executor: {e}"
                                  ) from e


def _greedy(problem: str, backend: Any, kernel: Any, agent_cfg: Any, reference: str | None,
            model_name: str, stack: contextlib.ExitStack, session_db: str | Path | None,
            thread_id: str | None, on_event: Event | None,
            status: Callable[[str], None]) -> SolveResult:
    from tirforge.agent.graph import solve_stream

    checkpointer = None
    if session_db is not None:
        import sqlite3

        from langgraph.checkpoint.sqlite import SqliteSaver

        conn = stack.enter_context(contextlib.closing(
            sqlite3.connect(session_db, check_same_thread=False)))
        checkpointer, thread_id = SqliteSaver(conn), thread_id or "default"
    status("thinking ...")
    traj = None
    for node, item in solve_stream(problem, backend, kernel, agent_cfg, reference=reference,
                                   model_name=model_name, checkpointer=checkpointer,
                                   thread_id=thread_id):
        if isinstance(item, Trajectory):
            traj = item
        elif on_event is not None:
            on_event(node, item)
    assert traj is not None  # solve_stream always ends with the trajectory
    return SolveResult(traj)
