"""Collection on a Ray cluster: the same batched runner on many machines, one exactly-once store.

``RayCollector`` starts one actor per node (or ``RayConfig.actors``, placed round-robin over
the nodes). Each actor builds its own model backend (``BackendSpec``: a replay script, its own
transformers / vLLM engine on its GPUs, or a shared OpenAI-compatible endpoint) and its own
``KernelPool`` sized to its node's CPUs, and runs ``run_many`` on chunks of (problem, sample)
jobs, streaming every trajectory back as it ends (a Ray streaming generator).

Only the driver writes the store. It holds the store's writer lock (``Store.acquire``) for the
whole run, reads what is done after taking it, and appends each result as it arrives, so:

- a record is written once and whole (the store's single-writer, whole-line appends);
- an actor that dies (kill -9, OOM, node lost) loses nothing that was written: the jobs it
  still held go back to the queue and run on another actor (or on itself once Ray restarted
  it, ``RayConfig.max_restarts``); they are reported in ``CollectReport.retried``;
- a driver killed mid-run takes its actors with it (Ray ends actors with their owner) and
  drops the lock; running the command again resumes from the store without duplicates;
- the store need not be on a shared filesystem: it lives where the driver runs.

``ray`` is an optional extra (``pip install 'tirforge[ray]'``), imported only here, lazily.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tirforge.agent.pipelines.collect import (
    CollectReport,
    WorkerStats,
    job_seed,
    store_report,
)
from tirforge.trajectories.datasets import Problem
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store

__all__ = ["BackendSpec", "RayCollector", "RayConfig", "import_ray"]

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def import_ray() -> Any:
    """The ``ray`` module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "--ray needs Ray: pip install 'tirforge[ray]' (or pip install 'ray>=2.40') on the "
            "driver and on every node of the cluster"
        ) from e
    return ray


@dataclass
class BackendSpec:
    """How each actor builds its model backend (a backend object cannot travel between nodes).

    ``replay_turns``: testing, every trajectory replays these assistant turns. Otherwise
    ``make_run_backend(model, backend=..., base_url=...)``: with ``backend="openai"`` and a
    ``base_url`` every actor calls one shared endpoint (e.g. a vLLM fleet behind a router);
    with ``transformers`` / ``vllm`` each actor loads the model itself (give it GPUs with
    ``RayConfig.gpus_per_actor``); ``model`` must then be a name or a path every node has.
    """

    model: str = "smollm2"
    backend: str = "transformers"
    replay_turns: list[str] | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    allow_network: bool = False

    def build(self, max_batch: int) -> Any:
        if self.replay_turns is not None:
            from tirforge.agent.backends.replay import ReplayBackend

            return ReplayBackend(list(self.replay_turns))
        from tirforge.agent.pipelines.collect import make_run_backend

        return make_run_backend(self.model, allow_network=self.allow_network,
                                max_batch=max_batch, backend=self.backend,
                                base_url=self.base_url, api_key_env=self.api_key_env)


@dataclass
class RayConfig:
    """Where and how wide a distributed collection runs."""

    address: str | None = None
    """Cluster to join (``ray://`` or ``host:port``); None: the local Ray instance, i.e. the
    cluster in ``RAY_ADDRESS`` or one started with ``ray start`` on this machine, else a new
    one started here with ``local_cpus`` CPUs."""
    actors: int | None = None
    """Actors in all; None: one per alive node. Placed round-robin over the nodes."""
    concurrency: int | None = None
    """Trajectories in flight per actor (its kernel pool); None: its node's CPUs divided by the
    actors on that node (at least 1)."""
    gpus_per_actor: float = 0.0
    """GPUs reserved per actor (for an in-process vLLM / transformers model)."""
    chunk: int | None = None
    """Jobs handed to an actor at once; None: 4 x its concurrency, smaller near the end so the
    last jobs spread over every actor."""
    max_restarts: int = 3
    """Times Ray restarts a dead actor (new process, same node) before giving it up."""
    restart_timeout: float = 600.0
    """Seconds to wait for a restarted actor to be ready (it reloads its model and kernels)."""
    local_cpus: int | None = None
    """CPUs of a local instance this process starts (None: all)."""
    object_store_mb: int | None = None
    """Object store of a local instance this process starts (None: Ray's default)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set in every actor before it builds its backend."""

    def __post_init__(self) -> None:
        for name in ("actors", "concurrency", "chunk", "local_cpus", "object_store_mb"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ray {name.replace('_', ' ')} must be at least 1, not {value}")
        if self.gpus_per_actor < 0 or self.max_restarts < 0 or self.restart_timeout <= 0:
            raise ValueError("gpus_per_actor and max_restarts must be >= 0, "
                             "restart_timeout > 0")


class _CollectActor:
    """Runs jobs on its node: one backend, one kernel pool, the batched runner."""

    def __init__(self, spec: BackendSpec, exec_cfg: Any, concurrency: int,
                 env: dict[str, str], threads: int) -> None:
        from tirforge.executors import KernelPool

        os.environ.update(env)
        # Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU: a model on the CPU would
        # run on one core. Give it this actor's share of the node instead.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        self.concurrency = concurrency
        self.backend = spec.build(max_batch=concurrency)
        self.pool = KernelPool(replace(exec_cfg, pool_size=concurrency)).start()

    def info(self) -> dict[str, Any]:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        # Several nodes may share an address (a laptop cluster): the id tells them apart.
        return {"pid": os.getpid(), "node": f"{ray.util.get_node_ip_address()}/{node_id[:6]}",
                "concurrency": self.concurrency}

    def run(self, jobs: list[tuple[Problem, int]], agent_cfg: Any, model_name: str):
        """Yields ``(problem id, sample, trajectory JSON or None, error or None)`` per job as
        it ends (a Ray streaming generator: the driver stores each one at once)."""
        from tirforge.agent.runner import RunnerConfig, run_many

        out: queue.Queue = queue.Queue()

        def on_result(p: Problem, k: int, res: Trajectory | BaseException) -> None:
            if isinstance(res, BaseException):
                out.put((p.id, k, None, f"{type(res).__name__}: {res}"))
            else:
                out.put((p.id, k, res.model_dump_json(), None))

        def work() -> None:
            try:
                runner = RunnerConfig(max_concurrency=self.concurrency,
                                      max_batch=self.concurrency)
                run_many([p for p, _ in jobs], self.backend, self.pool, agent_cfg, runner,
                         jobs=jobs, seed_of=job_seed, on_result=on_result,
                         model_name=model_name)
            except BaseException as e:  # a runner failure fails the chunk's remaining jobs
                out.put(e)
            out.put(None)

        threading.Thread(target=work, daemon=True, name="collect-chunk").start()
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.pool.close()


@dataclass
class _Slot:
    handle: Any
    stats: WorkerStats


class RayCollector:
    """Actors on a Ray cluster that collect into one store; a context manager.

    ``collect`` has ``run_collect``'s contract (same keys, seeds and report) and may be called
    many times (``tirforge eval`` runs every benchmark and config on the same actors).
    Raises ImportError without Ray, ConnectionError when ``address`` cannot be reached,
    RuntimeError when an actor cannot build its backend or start its kernels.
    """

    def __init__(self, spec: BackendSpec, exec_cfg: Any, cfg: RayConfig | None = None,
                 log: Log = _quiet) -> None:
        self.spec, self.exec_cfg, self.cfg, self.log = spec, exec_cfg, cfg or RayConfig(), log
        self.slots: list[_Slot] = []
        self._ray: Any = None
        self._started_ray = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> RayCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        ray = self._ray = import_ray()
        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if self.cfg.address is not None:
            ray.init(address=self.cfg.address, **kw)
        else:
            try:
                ray.init(address="auto", **kw)
            except ConnectionError:  # no cluster here yet: start one in this process
                ray.init(address="local", num_cpus=self.cfg.local_cpus, include_dashboard=False,
                         object_store_memory=(self.cfg.object_store_mb or 0) * 2**20 or None,
                         **kw)
        self._started_ray = True

    def start(self) -> RayCollector:
        self._connect()  # first: a missing Ray is reported by import_ray's message
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            raise RuntimeError("the Ray cluster has no live node")
        n_actors = self.cfg.actors or len(nodes)
        placed = [nodes[i % len(nodes)] for i in range(n_actors)]
        per_node = {n["NodeID"]: placed.count(n) for n in nodes}
        actor_cls = ray.remote(_CollectActor)
        handles = []
        for node in placed:
            cpus = int(node.get("Resources", {}).get("CPU", 1))
            share = max(1, cpus // per_node[node["NodeID"]])  # this actor's CPUs
            conc = self.cfg.concurrency or share
            # Kernels are processes Ray does not see: the pool is sized to the node's CPUs
            # instead of reserving them, so actors need no CPU of Ray's own.
            handles.append((conc, actor_cls.options(
                num_cpus=0, num_gpus=self.cfg.gpus_per_actor, max_concurrency=2,
                max_restarts=self.cfg.max_restarts, max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(self.spec, self.exec_cfg, conc, self.cfg.env, share)))
        try:
            infos = ray.get([h.info.remote() for _, h in handles])
        except ray.exceptions.RayError as e:  # e.g. no bwrap / docker image / model on a node
            for _, h in handles:
                ray.kill(h, no_restart=True)
            self.close()
            raise RuntimeError(f"a Ray actor could not start (backend, kernels): {e}") from e
        self.slots = [
            _Slot(h, WorkerStats(name=f"actor-{i}", node=info["node"], pid=info["pid"],
                                 concurrency=conc))
            for i, ((conc, h), info) in enumerate(zip(handles, infos, strict=True))
        ]
        self.log(f"ray: {len(self.slots)} actors on {len(nodes)} nodes, "
                 f"{sum(s.stats.concurrency for s in self.slots)} trajectories in flight")
        return self

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        for s in self.slots:
            try:
                ray.get(s.handle.close.remote(), timeout=30)
            except Exception:  # dead or stuck: kill it anyway (bwrap kernels die with it)
                pass
            ray.kill(s.handle, no_restart=True)
        self.slots = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- collecting ------------------------------------------------------------------------
    def collect(self, problems: Sequence[Problem], *, samples: int, store: Store, cfg_hash: str,
                agent_cfg: Any, model_name: str = "",
                on_done: Callable[[Trajectory | None], None] | None = None) -> CollectReport:
        """Solve every (problem, sample) not yet in ``store`` on the actors; each result is
        stored by this process as it arrives. Jobs that raise are counted as failed (a re-run
        retries them); jobs of an actor that died are re-run on a live one."""
        if not self.slots:
            raise RuntimeError("RayCollector is not started (use it as a context manager)")
        for s in self.slots:  # this call's figures (restarts and pid carry over)
            s.stats.trajectories = s.stats.retried = 0
            s.stats.seconds = 0.0
        t0 = time.perf_counter()
        store.acquire()  # the only writer from here on; what is done is read under the lock
        done = store.done_keys()
        by_id = {p.id: p for p in problems}
        if len(by_id) != len(problems):
            raise ValueError("problem ids must be unique to be stored by key")
        pending: deque[tuple[str, int]] = deque(
            (p.id, k) for p in problems for k in range(samples) if (p.id, k, cfg_hash) not in done)
        run = _Run(self, pending, by_id, agent_cfg, model_name)
        new, failed = 0, []
        for kind, payload in run.events():
            if kind == "result":
                pid, k, blob, err = payload
                traj = None
                if (pid, k, cfg_hash) in done:  # never twice, whatever arrives
                    continue
                if err is not None:
                    failed.append(f"{pid}#{k}: {err}")
                else:
                    traj = Trajectory.model_validate_json(blob)
                    traj.problem_id, traj.sample, traj.config_hash = pid, k, cfg_hash
                    store.add(traj)
                    done.add((pid, k, cfg_hash))
                    new += 1
                if on_done is not None:
                    on_done(traj)
            else:
                self.log(payload)
        failed += [f"{pid}#{k}: no live actor left to run it" for pid, k in run.pending]
        rep = store_report(store, problems, samples, cfg_hash, new=new, failed=failed,
                           seconds=time.perf_counter() - t0)
        rep.retried = [f"{pid}#{k}" for pid, k in run.retried]
        rep.workers = [replace(s.stats) for s in self.slots]
        return rep


class _Run:
    """One ``collect`` call: a feeder thread per actor hands out chunks and relays results."""

    def __init__(self, owner: RayCollector, pending: deque[tuple[str, int]],
                 by_id: dict[str, Problem], agent_cfg: Any, model_name: str) -> None:
        self.owner, self.pending, self.by_id = owner, pending, by_id
        self.agent_cfg, self.model_name = agent_cfg, model_name
        self.in_flight = 0
        self.retried: list[tuple[str, int]] = []
        self.cond = threading.Condition()
        self.out: queue.Queue = queue.Queue()
        self.live = [s for s in owner.slots if s.stats.alive]

    def events(self):
        """("result", (pid, k, json | None, error | None)) and ("log", line) until done."""
        threads = [threading.Thread(target=self._feed, args=(s,), daemon=True,
                                    name=f"ray-feed-{s.stats.name}") for s in self.live]
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            item = self.out.get()
            if item is None:
                running -= 1
            else:
                yield item

    def _take(self, slot: _Slot) -> list[tuple[str, int]] | None:
        """The next chunk for ``slot``; waits while others may still hand jobs back."""
        with self.cond:
            while not self.pending and self.in_flight > 0:
                self.cond.wait()
            if not self.pending:
                return None
            conc = slot.stats.concurrency
            cap = self.owner.cfg.chunk or 4 * conc
            alive = sum(s.stats.alive for s in self.live) or 1
            n = min(cap, max(conc, math.ceil(len(self.pending) / (2 * alive))))
            chunk = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
            self.in_flight += len(chunk)
            return chunk

    def _finish(self, returned: list[tuple[str, int]], ran: int) -> None:
        with self.cond:
            self.pending.extendleft(reversed(returned))
            self.in_flight -= ran + len(returned)
            self.cond.notify_all()

    def _feed(self, slot: _Slot) -> None:
        ray = self.owner._ray
        from ray.exceptions import RayActorError

        try:
            while (chunk := self._take(slot)) is not None:
                left = set(chunk)
                t0 = time.perf_counter()
                try:
                    jobs = [(self.by_id[pid], k) for pid, k in chunk]
                    for ref in slot.handle.run.remote(jobs, self.agent_cfg, self.model_name):
                        pid, k, blob, err = ray.get(ref)
                        left.discard((pid, k))
                        slot.stats.trajectories += 1
                        self.out.put(("result", (pid, k, blob, err)))
                except RayActorError as e:
                    slot.stats.seconds += time.perf_counter() - t0
                    back = [j for j in chunk if j in left]
                    slot.stats.retried += len(back)
                    with self.cond:
                        self.retried += back
                    self._finish(back, len(chunk) - len(back))
                    self.out.put(("log", f"ray: {slot.stats.name} ({slot.stats.node}) died "
                                         f"({type(e).__name__}); {len(back)} jobs handed back"))
                    if not self._revive(slot):
                        return
                    continue
                except Exception as e:  # the actor raised: the chunk's rest fails, not retried
                    for pid, k in [j for j in chunk if j in left]:
                        self.out.put(("result", (pid, k, None, f"{type(e).__name__}: {e}")))
                    slot.stats.trajectories += len(left)
                slot.stats.seconds += time.perf_counter() - t0
                self._finish([], len(chunk))
        finally:
            self.out.put(None)

    def _revive(self, slot: _Slot) -> bool:
        """Wait for Ray's restart of a dead actor; False (and marked dead) if there is none."""
        info = self._info_after_restart(slot)
        if isinstance(info, str):
            with self.cond:
                slot.stats.alive = False
                self.cond.notify_all()
            self.out.put(("log", f"ray: {slot.stats.name} is gone ({info}); the others carry on"))
            return False
        slot.stats.restarts += 1
        slot.stats.pid = info["pid"]
        return True

    def _info_after_restart(self, slot: _Slot) -> dict[str, Any] | str:
        """The restarted actor's ``info()``, or why there is none."""
        ray = self.owner._ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.owner.cfg.restart_timeout
        while True:
            try:
                return ray.get(slot.handle.info.remote(),
                               timeout=max(1.0, deadline - time.monotonic()))
            except ActorUnavailableError:  # restarting: calls fail fast until it is back
                if time.monotonic() > deadline:
                    return "not back in time"
                time.sleep(0.5)
            except Exception as e:  # ActorDiedError: no restart left, or its node is gone
                return type(e).__name__
