"""Many trajectories at once: one event loop, one micro-batched backend, a pool of kernels.

Every trajectory is a run of the same compiled graph (``compiled_graph("async")``), its model
call, kernel, seed and tag in its ``RunContext``. When its
``generate`` node runs it puts a request on the ``MicroBatcher`` queue and waits; the batcher sends
whatever is queued to the backend as one batch, as soon as every trajectory that could still add
to it is waiting (or ``max_wait_ms`` has passed). Kernel cells run in worker threads meanwhile, so
execution of some trajectories overlaps generation for others.

``run_many`` is the synchronous entry point for collection, evaluation and RL rollouts.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.graph import (
    AgentConfig,
    RunContext,
    compiled_graph,
    initial_state,
    run_config,
)
from tirforge.agent.graph import to_trajectory as _to_trajectory
from tirforge.executors.base import AsyncExecutor
from tirforge.executors.pool import KernelPool
from tirforge.trajectories.datasets import Problem as DatasetProblem
from tirforge.trajectories.schema import Trajectory

Problem = str | Mapping[str, Any] | DatasetProblem
"""A problem text, a mapping with "problem" and optionally "reference" (or "answer") and
"problem_id" (or "id"), or a dataset ``Problem``."""
Progress = Callable[[int, int, Trajectory], None]
"""Called as (finished, total, trajectory) after each trajectory ends."""
OnResult = Callable[[Any, int, "Trajectory | BaseException"], None]
"""Called as (problem, sample index, trajectory or the exception that ended it)."""


@dataclass
class RunnerConfig:
    """How many trajectories run at once and how model calls are batched."""

    max_concurrency: int = 64
    """Trajectories in flight at most (also capped by the kernel pool's size)."""
    max_batch: int = 32
    """Requests per backend call at most."""
    max_wait_ms: float = 50.0
    """How long a batch may wait for more requests while some trajectories are still busy
    elsewhere (running a cell); it leaves at once when every live trajectory is waiting."""
    max_inflight_batches: int = 1
    """Backend calls at once: 1 for a local model (it uses the whole device), more for a
    server, which batches by itself."""
    samples: int = 1
    """Trajectories per problem; sample i uses seed ``sampling.seed + i`` when a seed is set."""


_RUNS = itertools.count()  # makes trajectory tags unique across runs in one process


def generate_isolating(backend: Backend, reqs: list[Request],
                       params: SamplingParams) -> list[Completion | Exception]:
    """``backend.generate`` of a batch, where a failing batch is split in halves until the
    requests that fail are alone: one bad request (longer than the context, a script with no
    turn left) fails only its own trajectory, not the others that happened to share its batch.
    Costs at most ``2 * len(reqs) - 1`` calls, only when something fails. An error marked
    ``batch_wide`` (a server that is down, retried by the backend already) is raised at once."""
    try:
        return list(backend.generate(reqs, params))
    except Exception as e:
        if len(reqs) == 1:
            return [e]
        if getattr(e, "batch_wide", False):
            raise
    mid = len(reqs) // 2
    return (generate_isolating(backend, reqs[:mid], params)
            + generate_isolating(backend, reqs[mid:], params))


class MicroBatcher:
    """An asyncio queue in front of a backend that turns single requests into batches."""

    def __init__(self, backend: Backend, cfg: RunnerConfig, live: Callable[[], int]):
        self.backend, self.cfg, self.live = backend, cfg, live
        self.queue: asyncio.Queue[tuple[Request, SamplingParams, asyncio.Future]] = (
            asyncio.Queue()
        )
        self.batches: list[int] = []
        """Size of every batch sent, for inspection and benchmarks."""
        self._threads = ThreadPoolExecutor(cfg.max_inflight_batches, thread_name_prefix="model")
        self._slots = asyncio.Semaphore(cfg.max_inflight_batches)
        self._task: asyncio.Task | None = None

    async def generate(self, req: Request, params: SamplingParams) -> Completion:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((req, params, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            first = await self.queue.get()
            # Wait for the backend first: requests pile up while it is busy, and all of them
            # go out together (otherwise trajectories drift into small alternating batches).
            await self._slots.acquire()
            batch = [first]
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            while len(batch) < min(self.cfg.max_batch, max(1, self.live())):
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                batch.append(item)
            asyncio.create_task(self._send(batch))

    async def _send(self, batch: list) -> None:
        try:
            # Requests with different sampling settings cannot share one backend call; the
            # seed can differ (it rides on each request).
            groups: dict[tuple, list] = {}
            for item in batch:
                key = tuple(sorted((k, v) for k, v in item[1].as_dict().items() if k != "seed"))
                groups.setdefault(key, []).append(item)
            loop = asyncio.get_running_loop()
            for items in groups.values():
                self.batches.append(len(items))
                reqs, params = [i[0] for i in items], items[0][1]
                try:
                    outs = await loop.run_in_executor(
                        self._threads, generate_isolating, self.backend, reqs, params
                    )
                except Exception as e:  # backend-wide: every waiting trajectory gets it
                    outs = [e] * len(items)
                for (*_, fut), out in zip(items, outs, strict=True):
                    if fut.done():
                        continue
                    if isinstance(out, BaseException):
                        fut.set_exception(out)
                    else:
                        fut.set_result(out)
        finally:
            self._slots.release()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _unpack(p: Problem) -> tuple[str, str | None, str | None]:
    if isinstance(p, str):
        return p, None, None
    if not isinstance(p, Mapping):  # a dataset Problem (id, problem, reference)
        return p.problem, p.reference, p.id
    ref = p.get("reference", p.get("answer"))
    pid = p.get("problem_id", p.get("id"))
    return p["problem"], None if ref is None else str(ref), None if pid is None else str(pid)


async def arun_many(
    problems: Sequence[Problem],
    backend: Backend,
    pool: KernelPool | None,
    config: AgentConfig | None = None,
    runner: RunnerConfig | None = None,
    *,
    progress: Progress | None = None,
    model_name: str = "",
    jobs: Sequence[tuple[Problem, int]] | None = None,
    seed_of: Callable[[Problem, int], int | None] | None = None,
    on_result: OnResult | None = None,
) -> list[Trajectory | BaseException]:
    """Solve every problem (``runner.samples`` times each); trajectories come back in input
    order, samples of one problem next to each other.

    ``jobs`` replaces that list with explicit (problem, sample index) pairs (a resumed
    collection runs only what is missing). ``seed_of(problem, sample)`` gives each trajectory
    its seed (default: ``sampling.seed + sample``). Without ``on_result`` the first failure
    propagates; with it, every job's trajectory or exception goes to ``on_result`` as it ends,
    the others carry on, and failures come back as exceptions in the list.
    """
    cfg, rcfg = config or AgentConfig(), runner or RunnerConfig()
    cfg.decomposes  # noqa: B018 - a config error stops the run before any job starts
    tools = cfg.fmt.uses_tools
    if tools and pool is None:
        raise ValueError(f"format {cfg.format!r} runs code: give a KernelPool")
    width = min(rcfg.max_concurrency, pool.size if tools and pool else rcfg.max_concurrency)
    todo = list(jobs) if jobs is not None else [
        (p, i) for p in problems for i in range(rcfg.samples)
    ]
    state = {"live": 0, "done": 0}
    # Every live trajectory may join the next batch (cells are short next to a model call).
    batcher = MicroBatcher(backend, rcfg, lambda: state["live"])
    cells = ThreadPoolExecutor(max(1, width), thread_name_prefix="cell")

    # One compiled graph for every trajectory (and run): the config, model call, kernel, seed
    # and tag are its runtime context.
    graph = compiled_graph("async")
    gate = asyncio.Semaphore(max(1, width))
    name = model_name or getattr(backend, "name", "")
    base_seed = cfg.sampling.seed
    run = next(_RUNS)

    def default_seed(problem: Problem, sample: int) -> int | None:
        return None if base_seed is None else base_seed + sample

    seed_for = seed_of or default_seed

    async def one(problem: Problem, sample: int) -> Trajectory:
        text, ref, pid = _unpack(problem)
        seed = seed_for(problem, sample)
        c = cfg if seed == base_seed else replace(cfg, sampling=replace(cfg.sampling, seed=seed))
        tag = f"{pid if pid is not None else text[:40]}#{sample}@{run}"
        async with gate:
            state["live"] += 1
            t0 = time.perf_counter()
            try:
                ctx = RunContext(agent=c, agenerate=batcher.generate, seed=seed, tag=tag)
                if tools:
                    assert pool is not None
                    async with pool.akernel() as kernel:
                        ctx.executor = AsyncExecutor(kernel, cells)
                        final = await graph.ainvoke(initial_state(text, c), run_config(c),
                                                    context=ctx)
                else:
                    final = await graph.ainvoke(initial_state(text, c), run_config(c),
                                                context=ctx)
            finally:
                state["live"] -= 1
        traj = _to_trajectory(final, c, reference=ref, problem_id=pid, model_name=name,
                              total_s=time.perf_counter() - t0)
        traj.sample = sample
        state["done"] += 1
        if progress is not None:
            progress(state["done"], len(todo), traj)
        return traj

    async def guarded(problem: Problem, sample: int) -> Trajectory | BaseException:
        try:
            result: Trajectory | BaseException = await one(problem, sample)
        except Exception as e:  # one bad trajectory must not stop a long run
            if on_result is None:
                raise
            result = e
        if on_result is not None:
            on_result(problem, sample, result)
        return result

    try:
        return list(await asyncio.gather(*(guarded(p, i) for p, i in todo)))
    finally:
        batcher.close()
        cells.shutdown(wait=False)


def run_many(
    problems: Sequence[Problem],
    backend: Backend,
    pool: KernelPool | None,
    config: AgentConfig | None = None,
    runner: RunnerConfig | None = None,
    *,
    progress: Progress | None = None,
    model_name: str = "",
    jobs: Sequence[tuple[Problem, int]] | None = None,
    seed_of: Callable[[Problem, int], int | None] | None = None,
    on_result: OnResult | None = None,
) -> list[Trajectory | BaseException]:
    """Synchronous ``arun_many``: solve many problems concurrently with batched model calls."""
    return asyncio.run(
        arun_many(problems, backend, pool, config, runner, progress=progress,
                  model_name=model_name, jobs=jobs, seed_of=seed_of, on_result=on_result)
    )
