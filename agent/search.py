"""Reward-guided step-level beam search over the tool-integrated reasoning loop.

Sample-then-choose strategies (``tirforge.agent.strategies.choose``) judge whole solutions;
step search uses the scorer while solving: after every model turn (plus its code cell and any
reflection) it samples M continuations of each kept partial trajectory, scores all B×M
partial trajectories, keeps the best B and goes on until every kept trajectory has finished
(answered, or ended by the agent's budgets) or the search's own budgets run out.

The loop is the compiled graph of ``tirforge.agent.graph``, not a re-implementation: each
search node is a LangGraph checkpoint paused before ``generate`` (``interrupt_before``), and
expanding a node resumes the graph from that checkpoint for exactly one turn, so the search tree
is the checkpoint tree of one thread (each resume forks it). The M continuations of all open
nodes are drawn in one batched backend call (``SamplingParams.n = M``) and handed to the graph
one by one.

Kernel state: every candidate needs the namespace its own earlier cells built.
``StepSearchConfig.kernel_state`` picks how it gets it:

- ``fork`` (``auto`` picks it when the executor ``supports_fork``): every node of the tree
  holds a kernel in its state; a candidate that runs code forks its node's kernel on its first
  cell (``Executor.fork``: tens of ms, no cell re-run) and its fork becomes its node's kernel.
  The state is the one the model saw -- random draws, clock reads, timed-out cells' partial
  effects included. Kernels of nodes that leave the beam are closed after each step; at most
  B x M + B are alive at once (a kernel and its forks share one sandbox's caps, see
  ``KernelExecutor.fork``). A fork that fails (its kernel died) falls back to replay for that
  candidate, on a fork of the root (or the root itself).
- ``replay``: one kernel is shared, and before a candidate runs its first cell the kernel is
  brought to that candidate's state by replaying its earlier cells (after a reset, unless the
  kernel already holds a prefix of them). Correct for deterministic code, one kernel whatever B
  and M are; it costs re-running earlier cells (O(steps) cells per expansion) and replays
  recompute rather than restore: unseeded randomness or wall-clock reads may differ from what
  the model saw. Cells that timed out are not replayed (each replay would wait the full timeout
  again), so their partial side effects are lost; cells before a kernel restart are dropped, as
  the restart lost them too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.graph import (
    AgentConfig,
    AgentState,
    GenerateFn,
    RunContext,
    compiled_graph,
    generate_request,
    initial_state,
    run_config,
    to_trajectory,
)
from tirforge.agent.kernel_state import replay_cells
from tirforge.agent.strategies import Scorer
from tirforge.executors.base import Executor
from tirforge.executors.result import ExecutionResult, ForkFailed
from tirforge.trajectories.grading import extract_boxed
from tirforge.trajectories.schema import Trajectory

# Checkpoints hold Step / ExecutionResult models: allow exactly those to be deserialised.
_SERDE_MODULES = [
    ("tirforge.trajectories.schema", "Step"),
    ("tirforge.executors.result", "ExecutionResult"),
]


def _default_agent() -> AgentConfig:
    # Greedy decoding would give M identical continuations: sample as Qwen2.5-Math's eval does.
    return AgentConfig(sampling=SamplingParams(temperature=0.7, top_p=0.8))


@dataclass
class StepSearchConfig:
    """Beam width, branching and budgets of a step search, and the agent it drives."""

    beam_width: int = 2
    """Partial trajectories kept after each step (B). Finished trajectories keep their place
    in the beam while they score among the best B; the search ends when all B have finished."""
    expansions_per_step: int = 4
    """Continuations sampled from every open (unfinished) kept trajectory per step (M): up to
    B×M candidates are run and scored per step."""
    max_steps: int | None = None
    """Expansion rounds at most (None: ``agent.max_turns``, after which the agent's turn
    budget has ended every candidate anyway)."""
    max_expansions: int | None = None
    """Sampled continuations at most over the whole search (None: no limit), i.e. a cap on
    model turns generated; when fewer than B×M are left, the best beams are expanded first."""
    dedupe: bool = True
    """Drop a continuation whose text equals a sibling's: identical children would fill the
    beam with one path (with greedy decoding every sibling is a duplicate)."""
    kernel_state: Literal["auto", "fork", "replay"] = "auto"
    """How a candidate gets the kernel state of its earlier cells: ``fork`` its node's kernel,
    ``replay`` the cells on one shared kernel, or ``auto``: fork when the executor
    ``supports_fork`` (see the module doc)."""
    agent: AgentConfig = field(default_factory=_default_agent)
    """Prompt format, per-trajectory budgets (turns, tokens) and sampling of each turn. Needs
    a temperature above 0 for the M continuations to differ. ``max_time_s`` bounds the
    search's wall time as well as each candidate's (whose turns count the whole batched call
    that generated them)."""


@dataclass
class SearchResult:
    """What a step search found."""

    best: Trajectory
    """The highest-scoring finished trajectory seen (ties: the earliest to finish). If the
    search's budget ran out before anything finished, the best partial trajectory, with
    ``stop_reason="max_turns"``."""
    finished: list[Trajectory]
    """Every finished candidate, kept in the beam or not, in the order they finished; each
    carries its ``score``."""
    steps: int = 0
    """Expansion rounds run."""
    expansions: int = 0
    """Continuations sampled (model turns generated, duplicates included)."""
    beam_scores: list[list[float]] = field(default_factory=list)
    """Scores of the kept beam after each step, best first."""
    replayed_cells: int = 0
    """Cells re-run to restore kernel state (the price of sharing one kernel)."""
    kernel_state: str = "replay"
    """How candidates got their kernel state: ``fork`` or ``replay``."""
    forks: int = 0
    """Kernels forked (fork mode: one per candidate that ran code)."""


@dataclass
class _Node:
    config: dict
    """LangGraph config of the checkpoint this node is (thread + checkpoint id)."""
    state: AgentState
    done: bool
    traj: Trajectory | None = None
    score: float = 0.0
    kernel: Any = None
    """Fork mode: a kernel holding this node's state (its own fork, or its parent's kernel
    when it ran no code)."""


def _fixed(completion: Completion, prefix: str) -> GenerateFn:
    """A one-shot backend for the graph: the continuation that was already sampled."""
    used = False

    def generate(req: Request, params: SamplingParams) -> Completion:
        nonlocal used
        if used:
            raise RuntimeError("step search: the graph asked for a second turn in one step")
        if req.prefix != prefix:  # the graph resumed from another state than the sampled one
            raise RuntimeError("step search: the graph's generate request does not match "
                               "the sampled candidate's")
        used = True
        return completion

    return generate


class _SharedKernel:
    """One kernel serving every candidate; ``cells`` is what it has run since its last reset
    (None: unknown, e.g. after a timeout; the next candidate resets it)."""

    def __init__(self, kernel: Executor):
        self.kernel = kernel
        self.cells: list[str] | None = None  # a kernel we are handed may hold anything
        self.replayed = 0

    def prepare(self, cells: list[str]) -> None:
        have = self.cells
        if have is None or have != cells[: len(have)]:
            self.kernel.reset()
            have = []
        clean = True
        for code in cells[len(have):]:
            res = self.kernel.run(code)
            self.replayed += 1
            clean = clean and not (res.timed_out or res.restarted)
        # A replay that timed out or lost the kernel leaves it in an unknown state.
        self.cells = list(cells) if clean else None

    def run(self, code: str, timeout: float | None) -> ExecutionResult:
        res = self.kernel.run(code, timeout)
        if res.restarted:
            self.cells = []
        elif res.timed_out or self.cells is None:
            self.cells = None
        else:
            self.cells.append(code)
        return res


class _CandidateKernel:
    """The kernel as one candidate sees it: restored to its cells on its first run only, so
    candidates that answer without code cost nothing."""

    def __init__(self, shared: _SharedKernel, cells: list[str]):
        self.shared, self.cells, self.ready = shared, cells, False

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        if not self.ready:
            self.shared.prepare(self.cells)
            self.ready = True
        return self.shared.run(code, timeout)


class _Forks:
    """Fork mode: the kernels of the tree's nodes. ``root`` (reset once) holds the empty
    state and never runs a cell; every other kernel is a fork owned here."""

    def __init__(self, root: Executor):
        root.reset()
        self.root = root
        self.owned: list[Executor] = []
        # Kernels that left the beam are closed off the search's path; ``close`` waits.
        self._closer = ThreadPoolExecutor(1, thread_name_prefix="search-fork-close")
        self.forks = 0
        self.replay: _SharedKernel | None = None  # fallback once even the root cannot fork
        self.replayed = 0

    def fork(self, kernel: Executor, cells: list[str]) -> Executor | _SharedKernel:
        """A kernel in the state of ``cells`` for one candidate: a fork of ``kernel`` (which
        holds that state), else a fork of the root with ``cells`` replayed, else replay."""
        try:
            child = kernel.fork()
            self.forks += 1
            self.owned.append(child)
            return child
        except ForkFailed:
            pass
        if self.replay is None:
            try:
                child = self.root.fork()
                self.forks += 1
                self.owned.append(child)
                for code in cells:
                    child.run(code)
                    self.replayed += 1
                return child
            except ForkFailed:
                self.replay = _SharedKernel(self.root)
        self.replay.prepare(cells)
        return self.replay

    def keep_only(self, kernels: list[Any]) -> None:
        """Close every owned kernel not in ``kernels`` (nodes that left the beam)."""
        keep = {id(k) for k in kernels}
        for k in [k for k in self.owned if id(k) not in keep]:
            self._closer.submit(k.close)
        self.owned = [k for k in self.owned if id(k) in keep]

    def close(self) -> None:
        """Close every fork and wait until all are closed."""
        self.keep_only([])
        self._closer.shutdown(wait=True)


class _ForkCandidate:
    """The kernel as one candidate sees it in fork mode: its node's kernel is forked on the
    candidate's first cell, so candidates that answer without code cost nothing."""

    def __init__(self, forks: _Forks, parent: Executor, cells: list[str]):
        self.forks, self.parent, self.cells = forks, parent, cells
        self.kernel: Any = None

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        if self.kernel is None:
            self.kernel = self.forks.fork(self.parent, self.cells)
        return self.kernel.run(code, timeout)

    @property
    def state(self) -> Any:
        """The kernel that holds this candidate's state now (a replay kernel is nobody's)."""
        if isinstance(self.kernel, _SharedKernel):
            return None
        return self.kernel if self.kernel is not None else self.parent


def _sample(
    backend: Backend, states: list[AgentState], cfg: AgentConfig, m: int, seed: int | None
) -> list[list[Completion]]:
    """``m`` continuations of every state, one backend call per distinct sampling setting."""
    reqs = [generate_request(s, cfg) for s in states]
    groups: dict[tuple, list[int]] = {}
    for i, (_, params) in enumerate(reqs):
        groups.setdefault(tuple(sorted(params.as_dict().items())), []).append(i)
    out: list[list[Completion]] = [[] for _ in states]
    for idx in groups.values():
        params = replace(reqs[idx[0]][1], n=m, seed=seed)
        t0 = time.perf_counter()
        comps = backend.generate([reqs[i][0] for i in idx], params)
        for c in comps:  # every candidate waited for the whole batch: that is its turn time
            c.extra["gen_s"] = time.perf_counter() - t0
        if len(comps) != len(idx) * m:
            raise RuntimeError(f"backend returned {len(comps)} completions for "
                               f"{len(idx)} requests x n={m}")
        for k, i in enumerate(idx):
            out[i] = comps[k * m : (k + 1) * m]
    return out


def step_search(
    problem: str,
    backend: Backend,
    kernel: Executor | None,
    scorer: Scorer,
    config: StepSearchConfig | None = None,
    *,
    reference: str | None = None,
    problem_id: str | None = None,
    model_name: str = "",
    on_step: Callable[[int, list[Trajectory]], None] | None = None,
) -> SearchResult:
    """Solve ``problem`` by step-level beam search guided by ``scorer``.

    ``kernel`` is one started (or startable) executor: forked per candidate, or reset and
    replayed as candidates alternate (``config.kernel_state``); None only for formats without
    code. ``on_step(step, beam)`` sees the kept
    trajectories (best first, with scores) after each step. Finished trajectories are graded
    against ``reference``; partial ones reach the scorer ungraded.
    """
    sc = config or StepSearchConfig()
    cfg = sc.agent
    if sc.beam_width < 1 or sc.expansions_per_step < 1:
        raise ValueError("beam_width and expansions_per_step must be at least 1")
    if cfg.fmt.uses_tools and kernel is None:
        raise ValueError(f"format {cfg.format!r} runs code: give a kernel")
    if sc.kernel_state not in ("auto", "fork", "replay"):
        raise ValueError(f"kernel_state must be auto, fork or replay, not {sc.kernel_state!r}")
    can_fork = bool(getattr(kernel, "supports_fork", False))
    if sc.kernel_state == "fork" and kernel is not None and not can_fork:
        raise ValueError(f"kernel_state='fork': {type(kernel).__name__} cannot fork")
    use_fork = kernel is not None and can_fork and sc.kernel_state != "replay"
    saver = InMemorySaver(serde=JsonPlusSerializer(allowed_msgpack_modules=_SERDE_MODULES))
    graph = compiled_graph("sync", saver)
    thread = uuid.uuid4().hex
    shared = _SharedKernel(kernel) if kernel is not None and not use_fork else None
    forks = _Forks(kernel) if use_fork and kernel is not None else None
    try:
        return _search(problem, backend, scorer, sc, graph, thread, shared, forks, reference,
                       problem_id, model_name, on_step)
    finally:
        if forks is not None:
            forks.close()


def _search(
    problem: str, backend: Backend, scorer: Scorer, sc: StepSearchConfig, graph: Any,
    thread: str, shared: _SharedKernel | None, forks: _Forks | None, reference: str | None,
    problem_id: str | None, model_name: str,
    on_step: Callable[[int, list[Trajectory]], None] | None,
) -> SearchResult:
    cfg = sc.agent
    name = model_name or getattr(backend, "name", "")
    t0 = time.perf_counter()

    def snapshot() -> _Node:
        # Expansions run one at a time, so the thread's latest checkpoint is the one just made.
        snap = graph.get_state({"configurable": {"thread_id": thread}})
        return _Node(config=snap.config, state=snap.values, done=not snap.next)

    def trajectory(node: _Node) -> Trajectory:
        return to_trajectory(
            node.state, cfg, reference=reference if node.done else None,
            problem_id=problem_id, model_name=name, total_s=time.perf_counter() - t0,
        )

    def run(node: _Node | None, gen: Any, cells: list[str]) -> _Node:
        runner: Any = None
        if shared is not None:
            runner = _CandidateKernel(shared, cells)
        elif forks is not None:
            runner = _ForkCandidate(forks, node.kernel if node else forks.root, cells)
        rc = run_config(cfg, thread)
        if node is not None:  # resume (and so fork) from this node's checkpoint
            rc["configurable"].update(node.config["configurable"])
        ctx = RunContext(agent=cfg, backend=gen, executor=runner)
        graph.invoke(None if node else initial_state(problem, cfg), rc,
                     interrupt_before=["generate"], context=ctx)
        child = snapshot()
        if isinstance(runner, _ForkCandidate):
            child.kernel = runner.state
            if child.kernel is None:  # restored by the replay fallback: fork or replay again
                child.kernel = forks.root if forks is not None else None
        return child

    # The root: the decomposition turn (formats that have one), paused before generating.
    beam = [run(None, backend, [])]
    result = SearchResult(best=trajectory(beam[0]), finished=[],
                          kernel_state="fork" if forks is not None else "replay")
    if beam[0].done:
        beam[0].traj = result.best
        result.finished.append(result.best)
    max_steps = cfg.max_turns if sc.max_steps is None else sc.max_steps
    while result.steps < max_steps:
        open_ = [n for n in beam if not n.done]
        if not open_:
            break
        if cfg.max_time_s is not None and time.perf_counter() - t0 >= cfg.max_time_s:
            break
        m = sc.expansions_per_step
        if sc.max_expansions is not None:
            left = sc.max_expansions - result.expansions
            if left <= 0:
                break
            if left < m * len(open_):  # the beam is sorted: the best nodes go first
                m = max(1, left // len(open_))
                open_ = open_[:left]
        seed = None if cfg.sampling.seed is None else cfg.sampling.seed + result.steps
        samples = _sample(backend, [n.state for n in open_], cfg, m, seed)
        result.expansions += len(open_) * m
        children: list[_Node] = []
        for node, comps in zip(open_, samples, strict=True):
            prefix = generate_request(node.state, cfg)[0].prefix
            seen: set[str] = set()
            for c in comps:
                if sc.dedupe and c.text in seen:
                    continue
                seen.add(c.text)
                cells = replay_cells(node.state["steps"])
                children.append(run(node, _fixed(c, prefix), cells))
        for child in children:
            child.traj = trajectory(child)
        scores = scorer.score([c.traj for c in children]) if children else []
        for child, s in zip(children, scores, strict=True):
            child.score = child.traj.score = float(s)
            if child.done:
                result.finished.append(child.traj)
        # Finished beams compete again (listed first, so they win ties); sorted() is stable.
        pool = [n for n in beam if n.done] + children
        beam = sorted(pool, key=lambda n: -n.score)[: sc.beam_width]
        result.steps += 1
        result.beam_scores.append([n.score for n in beam])
        if forks is not None:  # kernels of nodes that left the beam are not needed again
            forks.keep_only([n.kernel for n in beam])
        if on_step is not None:
            on_step(result.steps, [n.traj for n in beam if n.traj is not None])
    if shared is not None:
        result.replayed_cells = shared.replayed
    if forks is not None:
        result.forks = forks.forks
        result.replayed_cells = forks.replayed + (forks.replay.replayed if forks.replay else 0)
    if result.finished:
        result.best = max(result.finished, key=lambda t: t.score or 0.0)
    elif beam[0].traj is not None:  # budget out before anything finished: best partial
        best = beam[0]
        answer = extract_boxed(cfg.fmt.render_prefix(best.state["steps"]))
        best.state = {**best.state, "final_answer": answer, "stop_reason": "max_turns"}
        best.done = True
        result.best = trajectory(best).model_copy(update={"score": best.score})
    return result
