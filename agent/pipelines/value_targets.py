"""Monte-Carlo value targets from fresh rollouts: K continuations of the TIR loop from each step
prefix of the logged trajectories, graded against the reference (``--rollouts K``).

For every selected prefix "problem + first k steps" (``training.value_rollouts.select_prefixes``)
the policy continues the loop K times from exactly that state: the compiled graph of
``agent.graph`` is started on the prefix's ``AgentState`` (its messages and steps, turn count,
nudge and reflection counts; budgets count the continuation only) and each continuation is
graded by ``trajectories.grading`` against the trajectory's reference. The prefix's target is
the share correct among the K, mixed with the logged estimate as ``rollout_mix`` says
(``training.value_rollouts.combine_targets``).

Kernel state is restored before a continuation writes its first cell: a kernel leased from the
``KernelPool`` replays the prefix's cells (``agent.kernel_state.replay_cells``: timed-out cells
skipped, a restart drops what came before). When the executor can fork
(``getattr(executor, "supports_fork", False)`` and ``executor.fork() -> Executor``), the K
continuations run on K forks of that one kernel, so the prefix runs once and every continuation
sees the same namespace, randomness included; otherwise the K continuations run one after
another on the leased kernel, reset and replayed before each. Replays recompute: unseeded
randomness or clock reads may differ from what the logged trajectory saw.

Model calls of all prefixes in flight go through one ``agent.runner.MicroBatcher``, so a local
model generates for many continuations per forward pass. Each finished prefix is appended to a
``RolloutCache`` at once (keyed by problem, prefix hash, K and a hash of the rollout settings),
so a killed run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tirforge.agent.backends.base import Backend, SamplingParams
from tirforge.agent.graph import (
    AgentConfig,
    AgentState,
    RunContext,
    compiled_graph,
    run_config,
    to_trajectory,
)
from tirforge.agent.kernel_state import replay_cells
from tirforge.agent.runner import MicroBatcher, RunnerConfig
from tirforge.executors.base import AsyncExecutor, Executor
from tirforge.executors.pool import KernelPool
from tirforge.training.value_rollouts import (
    Prefix,
    RolloutCache,
    RolloutRecord,
    select_prefixes,
)
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import config_hash

OnRollout = Callable[[Prefix, int, Trajectory], None]
"""Called as (prefix, rollout index j, the graded continuation: prefix steps + new steps)."""
Progress = Callable[[int, int], None]
"""Called as (prefixes finished, prefixes to run) after each prefix (cached ones excluded)."""

_RUNS = itertools.count()


@dataclass
class RolloutSettings:
    """How the K continuations of a prefix are run."""

    k: int = 4
    """Continuations per prefix (K >= 1)."""
    max_turns: int = 4
    """Model turns a continuation may add after its prefix."""
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.95))
    """Sampling of every continuation turn; rollout j of a prefix gets seed ``seed`` + a hash of
    the prefix + j when ``seed`` is set."""
    concurrency: int = 4
    """Prefixes in flight at once (one leased kernel each)."""
    seed: int | None = 0
    """Base seed of the continuations (None: unseeded)."""
    policy: str = ""
    """Name of the rollout policy, part of the settings hash (another policy's outcomes are
    never reused from the cache)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"rollouts (K) must be at least 1, got {self.k}")
        if self.max_turns < 1 or self.concurrency < 1:
            raise ValueError("rollout max_turns and concurrency must be at least 1")

    @property
    def hash(self) -> str:
        d = asdict(self)
        d.pop("concurrency")  # how fast, not what: resuming with another width reuses results
        return config_hash(d)


@dataclass
class RolloutReport:
    """What a rollout-target run did."""

    prefixes: int = 0
    """Prefixes selected."""
    cached: int = 0
    """Of those, found finished in the cache (not rerun)."""
    ran: int = 0
    """Rolled out by this run."""
    failed: list[str] = field(default_factory=list)
    """``"problem:k: error"`` of each prefix whose rollouts raised (not cached; rerun next time)."""
    rollouts: int = 0
    """Continuations run by this run."""
    replayed_cells: int = 0
    """Cells re-run to restore kernels by this run."""
    forked: int = 0
    """Prefixes whose continuations ran on forks."""
    seconds: float = 0.0
    """Wall time of this run."""

    @property
    def seconds_per_prefix(self) -> float:
        return self.seconds / self.ran if self.ran else 0.0


# -- the state of a prefix -------------------------------------------------------------------------
def continuation_config(traj: Trajectory, k: int, settings: RolloutSettings) -> AgentConfig:
    """The agent config a continuation of ``traj.steps[:k]`` runs under: the trajectory's own
    format, no decomposition (a plan, if any, is in the prefix), ``k + settings.max_turns``
    turns in all, the rollout sampling."""
    return AgentConfig(format=traj.format or "qwen-tir", decompose=False,
                       max_turns=k + settings.max_turns, sampling=settings.sampling)


def prefix_state(traj: Trajectory, k: int, cfg: AgentConfig) -> AgentState:
    """The loop's state right after step ``k`` of ``traj``: its prompt messages and first ``k``
    steps, one turn per step, the answer nudge and reflections as the steps' feedback shows.
    Token and time budgets start afresh (they count the continuation). Raises ValueError for a
    k outside 1..len(steps) - 1 or a trajectory without prompt messages."""
    if not 1 <= k < len(traj.steps):
        raise ValueError(f"trajectory {traj.id}: prefix of {k} steps out of "
                         f"{len(traj.steps)} (1 <= k < steps: a finished state is not rolled out)")
    if not traj.messages:
        raise ValueError(f"trajectory {traj.id} has no prompt messages to continue from")
    steps = list(traj.steps[:k])
    fmt = cfg.fmt
    nudge = fmt.feedback.get("no_answer")
    own = {fmt.after_decompose} if fmt.after_decompose else set()
    return {
        "problem": traj.problem, "messages": list(traj.messages), "steps": steps, "turns": k,
        "tokens": 0, "elapsed_s": 0.0,
        "nudged": nudge is not None and any(s.feedback == nudge for s in steps),
        "reflections": sum(1 for s in steps if s.feedback and s.feedback != nudge
                           and s.feedback not in own),
    }


def restore(kernel: Executor, cells: list[str]) -> int:
    """Run ``cells`` in ``kernel`` (a fresh or reset one); the number run."""
    for code in cells:
        kernel.run(code)
    return len(cells)


def _seed(settings: RolloutSettings, prefix_hash: str, j: int) -> int | None:
    if settings.seed is None:
        return None
    return (settings.seed + zlib.crc32(prefix_hash.encode()) + j) % (2**31 - 1)


# -- running --------------------------------------------------------------------------------------
async def arollout_prefixes(
    prefixes: list[Prefix], backend: Backend, pool: KernelPool, settings: RolloutSettings,
    *, on_record: Callable[[RolloutRecord], None],
    on_error: Callable[[Prefix, BaseException], None],
    on_rollout: OnRollout | None = None, model_name: str = "",
) -> None:
    """Roll out every ``Prefix`` K times; hand each prefix's ``RolloutRecord`` to
    ``on_record`` as it finishes, or its exception to ``on_error`` (the others carry on), and
    each graded continuation to ``on_rollout``."""
    width = max(1, min(settings.concurrency, pool.size))
    live = {"n": 0}
    batcher = MicroBatcher(backend, RunnerConfig(max_concurrency=width * settings.k,
                                                 max_batch=width * settings.k),
                           lambda: live["n"])
    cells = ThreadPoolExecutor(width * settings.k + width, thread_name_prefix="value-cell")
    graph = compiled_graph("async")
    gate = asyncio.Semaphore(width)
    run = next(_RUNS)
    name = model_name or getattr(backend, "name", "")

    async def call(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(cells, fn, *args)

    async def continuation(p: Prefix, j: int, kernel: Executor) -> Trajectory:
        cfg = continuation_config(p.traj, p.k, settings)
        label = p.traj.problem_id if p.traj.problem_id is not None else p.traj.problem[:40]
        # "problem:k#j": a replay script keyed so (``ReplayBackend``) plays continuation j of
        # the prefix of k steps; "@..." keeps every continuation's script copy its own.
        ctx = RunContext(agent=cfg, agenerate=batcher.generate, seed=_seed(settings, p.hash, j),
                         tag=f"{label}:{p.k}#{j}@{run}.{p.hash}")
        ctx.executor = AsyncExecutor(kernel, cells)
        live["n"] += 1
        try:
            final = await graph.ainvoke(prefix_state(p.traj, p.k, cfg), run_config(cfg),
                                        context=ctx)
        finally:
            live["n"] -= 1
        return to_trajectory(final, cfg, reference=p.traj.reference,
                             problem_id=p.traj.problem_id, model_name=name)

    async def one(p: Prefix) -> None:
        t0 = time.perf_counter()
        prefix_cells = replay_cells(p.traj.steps[: p.k])
        async with gate, pool.akernel() as base:
            replayed = await call(restore, base, prefix_cells)
            forked = bool(getattr(base, "supports_fork", False))
            if forked:
                kids: list[Executor] = []
                try:
                    for _ in range(settings.k):
                        kids.append(await call(base.fork))
                    # Every continuation ends before the forks close, even when one raised.
                    got = await asyncio.gather(
                        *(continuation(p, j, kid) for j, kid in enumerate(kids)),
                        return_exceptions=True)
                    for g in got:
                        if isinstance(g, BaseException):
                            raise g
                    outs = list(got)
                finally:
                    for kid in kids:
                        with contextlib.suppress(Exception):
                            await call(kid.close)
            else:
                outs = []
                for j in range(settings.k):
                    if j:  # the previous continuation changed the namespace: back to the prefix
                        await call(base.reset)
                        replayed += await call(restore, base, prefix_cells)
                    outs.append(await continuation(p, j, base))
        if on_rollout is not None:
            for j, t in enumerate(outs):
                on_rollout(p, j, t)
        verdicts = [t.verdict for t in outs]
        on_record(RolloutRecord(
            problem=p.problem, prefix=p.hash, k=settings.k, settings=settings.hash,
            correct=sum(v == "correct" for v in verdicts), verdicts=verdicts, steps=p.k,
            seconds=time.perf_counter() - t0, replayed_cells=replayed, forked=forked))

    async def guarded(p: Prefix) -> None:
        try:
            await one(p)
        except Exception as e:  # one bad prefix must not stop a long run
            on_error(p, e)

    try:
        await asyncio.gather(*(guarded(p) for p in prefixes))
    finally:
        batcher.close()
        cells.shutdown(wait=False)


def require_references(prefixes: list[Prefix]) -> None:
    """ValueError naming the first prefix whose trajectory has no reference answer (its
    rollouts could not be graded)."""
    bad = [p.traj for p in prefixes if not (p.traj.reference or "").strip()]
    if bad:
        first = bad[0]
        raise ValueError(f"{len({b.id for b in bad})} graded trajectories have no reference "
                         f"answer (first: {first.id}, problem "
                         f"{first.problem_id or first.problem[:40]!r}): rollouts from their "
                         "prefixes cannot be graded")


def rollout_targets(
    trajs: list[Trajectory], backend: Backend, pool: KernelPool, settings: RolloutSettings,
    cache_path: str, *, max_prefixes_per_problem: int = 0, selection_seed: int = 0,
    progress: Progress | None = None, on_rollout: OnRollout | None = None, model_name: str = "",
) -> tuple[dict[tuple[str, str], RolloutRecord], RolloutReport]:
    """Roll out every selected prefix of ``trajs`` not yet in the cache at ``cache_path``;
    return ((problem, prefix hash) -> ``RolloutRecord``, cached and new, for these settings)
    and the run's report. Raises ValueError for a graded trajectory that has no reference
    (its rollouts could not be graded); prefixes whose rollouts raised are listed in
    ``report.failed`` and not cached."""
    t0 = time.perf_counter()
    prefixes = select_prefixes(trajs, max_prefixes_per_problem, selection_seed)
    require_references(prefixes)
    rep = RolloutReport(prefixes=len(prefixes))
    with RolloutCache(cache_path) as cache:  # holds the writer lock before reading what is done
        done = {(r.problem, r.prefix): r for r in cache.read().values()
                if r.k == settings.k and r.settings == settings.hash}
        todo = [p for p in prefixes if (p.problem, p.hash) not in done]
        rep.cached = len(prefixes) - len(todo)

        def on_record(rec: RolloutRecord) -> None:
            cache.add(rec)
            done[(rec.problem, rec.prefix)] = rec
            rep.ran += 1
            rep.rollouts += rec.k
            rep.replayed_cells += rec.replayed_cells
            rep.forked += rec.forked
            if progress is not None:
                progress(rep.ran + len(rep.failed), len(todo))

        def on_error(p: Prefix, e: BaseException) -> None:
            rep.failed.append(f"{p.problem}:{p.k}: {type(e).__name__}: {e}")
            if progress is not None:
                progress(rep.ran + len(rep.failed), len(todo))

        if todo:
            asyncio.run(arollout_prefixes(todo, backend, pool, settings, on_record=on_record,
                                          on_error=on_error, on_rollout=on_rollout,
                                          model_name=model_name))
    rep.seconds = time.perf_counter() - t0
    return done, rep


# -- the whole command ----------------------------------------------------------------------------
def settings_of(cfg: Any) -> RolloutSettings:
    """The rollout settings of a ``training.value.ValueTrainConfig``."""
    return RolloutSettings(
        k=cfg.rollouts, max_turns=cfg.rollout_max_turns, concurrency=cfg.rollout_concurrency,
        sampling=SamplingParams(max_new_tokens=cfg.rollout_max_new_tokens,
                                temperature=cfg.rollout_temperature, top_p=cfg.rollout_top_p),
        seed=cfg.seed, policy=cfg.rollout_model or cfg.model)


def train_value(cfg: Any, *, backend: Backend | None = None,
                progress: Progress | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """``tirforge train value``: with ``cfg.rollouts`` = K > 0, compute rollout targets (policy
    ``cfg.rollout_model`` or ``cfg.model`` on ``cfg.rollout_backend`` unless ``backend`` is
    given, kernels of ``cfg.rollout_executor``), mix them with the logged ones and train;
    otherwise train on the logged targets. Returns the model's folder. Raises ValueError for bad
    input and RuntimeError when some prefixes' rollouts failed (the finished ones stay cached:
    run again to resume)."""
    from tirforge.agent.pipelines.collect import make_run_backend
    from tirforge.executors.config import ExecutorConfig
    from tirforge.training import value
    from tirforge.training.data import load_records, require_trajectories
    from tirforge.training.value_rollouts import combine_targets

    if cfg.rollouts < 1:
        return value.train(cfg)
    settings = settings_of(cfg)
    trajs = require_trajectories(load_records(cfg.train_file), "value-model training")
    # Bad input fails before the policy loads.
    require_references(select_prefixes(trajs, cfg.max_prefixes_per_problem, cfg.seed))
    own = backend is None
    if backend is None:
        backend = make_run_backend(settings.policy, backend=cfg.rollout_backend,
                                   base_url=cfg.rollout_base_url,
                                   max_batch=cfg.rollout_concurrency * cfg.rollouts, log=log)
    try:
        pool_cfg = ExecutorConfig(backend=cfg.rollout_executor, timeout=cfg.rollout_cell_timeout,
                                  pool_size=cfg.rollout_concurrency)
        with KernelPool(pool_cfg) as pool:
            records, rep = rollout_targets(
                trajs, backend, pool, settings, cfg.rollout_cache_path,
                max_prefixes_per_problem=cfg.max_prefixes_per_problem,
                selection_seed=cfg.seed, progress=progress)
    finally:
        if own:  # free the policy before the value model loads
            del backend
            gc.collect()
    if log is not None:
        log(f"rollout targets: {rep.prefixes} prefixes ({rep.cached} cached, {rep.ran} rolled "
            f"out x{settings.k}, {rep.forked} on forks, {rep.replayed_cells} cells replayed) "
            f"in {rep.seconds:.1f}s -> {cfg.rollout_cache_path}")
    if rep.failed:
        raise RuntimeError(f"{len(rep.failed)} of {rep.prefixes} prefixes failed to roll out "
                           f"(first: {rep.failed[0]}); finished ones are cached in "
                           f"{cfg.rollout_cache_path}: run again to retry the rest")
    return value.train(cfg, combine_targets(trajs, records, cfg.rollout_mix))


__all__ = ["RolloutReport", "RolloutSettings", "arollout_prefixes", "continuation_config",
           "prefix_state", "require_references", "restore", "rollout_targets", "settings_of",
           "train_value"]
