"""Resumable batched collection: K graded trajectories per problem into a ``Store``.

The batched runner (``agent.runner``) solves the (problem, sample) jobs a store lacks, on
kernels from a ``KernelPool``; each graded trajectory is appended as it lands, so a killed run
continues where it stopped. ``tirforge collect``, ``eval``, ``evolve`` and ``loop`` all collect
through ``run_collect``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tirforge.trajectories.datasets import FieldMap, Problem
from tirforge.trajectories.faults import fault_counts
from tirforge.trajectories.grading import answers_equal
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.select import consensus
from tirforge.trajectories.store import Store


@dataclass
class WorkerStats:
    """One worker (a Ray actor) of a distributed collection."""

    name: str
    node: str
    """Node it runs on: ``address/first 6 hex digits of the Ray node id``."""
    pid: int
    """Process id of its latest incarnation (an actor restarted after a crash has a new one)."""
    concurrency: int
    """Trajectories in flight on it (its kernel pool size)."""
    trajectories: int = 0
    """Results it delivered in this run (stored, or failed jobs)."""
    retried: int = 0
    """Jobs it had in hand when it died, handed back to the queue and run again."""
    restarts: int = 0
    """Times it died (process killed, OOM, node lost) and came back."""
    seconds: float = 0.0
    """Seconds it spent running jobs."""
    alive: bool = True

    @property
    def per_minute(self) -> float:
        """Trajectories per minute of its running time."""
        return 60.0 * self.trajectories / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CollectReport:
    """Summary of the trajectories in a store for one config over a problem set."""

    problems: int = 0
    trajectories: int = 0
    new: int = 0
    """Solved in this run (the rest were already in the store)."""
    failed: int = 0
    """Jobs that raised in this run; not stored, so a re-run retries them."""
    pass_at_1: float = 0.0
    pass_at_k: float = 0.0
    maj_at_k: float = 0.0
    mean_turns: float = 0.0
    error_rate: float = 0.0
    """(failed jobs + trajectories that stopped on an error) / attempts."""
    kernel_restarts: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    """Executed cells per fault kind (``ExecutionResult.fault``: error, timeout, memory, ...)."""
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    """``problem#sample`` of jobs re-run because the worker holding them died (Ray)."""
    workers: list[WorkerStats] = field(default_factory=list)
    """Per-worker throughput and retries (Ray); empty for a one-machine collection."""


def summarize(trajs: Sequence[Trajectory], problems: Sequence[Problem]) -> CollectReport:
    """pass@1, pass@k, maj@k (over labelled problems), mean turns and kernel restarts."""
    rep = CollectReport(problems=len(problems), trajectories=len(trajs))
    by_pid: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_pid[t.problem_id or ""].append(t)
    labelled = [p for p in problems if p.reference is not None and by_pid.get(p.id)]
    if labelled:
        p1 = pk = mj = 0.0
        for p in labelled:
            group = by_pid[p.id]
            ok = [t.verdict == "correct" for t in group]
            p1 += sum(ok) / len(ok)
            pk += any(ok)
            vote = consensus([t.final_answer for t in group], threshold=0.0, min_votes=1)
            mj += vote.answer is not None and answers_equal(vote.answer, p.reference or "")
        rep.pass_at_1, rep.pass_at_k, rep.maj_at_k = (
            x / len(labelled) for x in (p1, pk, mj)
        )
    rep.faults = fault_counts(trajs)
    if trajs:
        rep.mean_turns = sum(len(t.steps) for t in trajs) / len(trajs)
        rep.kernel_restarts = sum(
            1 for t in trajs for s in t.steps if s.execution is not None and s.execution.restarted
        )
    return rep


def job_seed(p: Problem, k: int) -> int:
    """A seed per (problem, sample): re-runs and resumes draw the same samples."""
    return zlib.crc32(f"{p.id}#{k}".encode())


def run_collect(
    problems: Sequence[Problem],
    *,
    samples: int,
    store: Store,
    cfg_hash: str,
    backend: Any,
    pool: Any,
    agent_cfg: Any,
    concurrency: int = 4,
    max_batch: int | None = None,
    model_name: str = "",
    on_done: Callable[[Trajectory | None], None] | None = None,
) -> CollectReport:
    """Solve every (problem, sample) not yet in ``store`` with the batched runner; each result
    is stored as it lands, and a job that raises is counted (and retried by the next run).

    Takes the store's writer lock first (``StoreLocked`` names the holder when another process
    writes it) and reads what is done only then, so no key is ever stored twice."""
    from tirforge.agent.runner import RunnerConfig, run_many

    t0 = time.perf_counter()
    store.acquire()
    done = store.done_keys()
    jobs = [
        (p, k) for p in problems for k in range(samples) if (p.id, k, cfg_hash) not in done
    ]
    failed: list[str] = []
    new = 0

    def on_result(p: Problem, k: int, res: Trajectory | BaseException) -> None:
        nonlocal new
        traj = None
        if isinstance(res, BaseException):
            failed.append(f"{p.id}#{k}: {type(res).__name__}: {res}")
        else:
            traj = res
            traj.problem_id, traj.sample, traj.config_hash = p.id, k, cfg_hash
            store.add(traj)
            new += 1
        if on_done is not None:
            on_done(traj)

    if jobs:
        runner = RunnerConfig(max_concurrency=max(1, concurrency),
                              max_batch=max_batch or max(1, concurrency))
        run_many(problems, backend, pool, agent_cfg, runner, jobs=jobs, seed_of=job_seed,
                 on_result=on_result, model_name=model_name)
    return store_report(store, problems, samples, cfg_hash, new=new, failed=failed,
                        seconds=time.perf_counter() - t0)


def store_report(store: Store, problems: Sequence[Problem], samples: int, cfg_hash: str, *,
                 new: int, failed: list[str], seconds: float) -> CollectReport:
    """The report of a collection over what the store holds for this config (each key once),
    with this run's ``new`` count and ``failed`` jobs (``"problem#k: error"``)."""
    wanted = {p.id for p in problems}
    trajs = [t for t in store if t.config_hash == cfg_hash and t.problem_id in wanted
             and (t.sample or 0) < samples]  # a larger earlier run must not skew pass@k
    rep = summarize(trajs, problems)
    rep.new, rep.failed, rep.errors = new, len(failed), list(failed)
    attempts = len(trajs) + len(failed)
    stopped_on_error = sum(t.stop_reason == "error" for t in trajs)
    rep.error_rate = (len(failed) + stopped_on_error) / attempts if attempts else 0.0
    rep.seconds = seconds
    return rep


def make_run_backend(
    model: str, replay: Path | None = None, *, allow_network: bool = False, max_batch: int = 8,
    backend: str = "transformers", base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY", log: Callable[[str], None] | None = None,
) -> Any:
    """The backend every trajectory of a run shares (the runner batches its calls, up to
    ``max_batch`` requests); a ``replay`` script (a JSON list of assistant turns) is played
    afresh by each trajectory. Without ``allow_network`` the hub is switched off
    (HF_HUB_OFFLINE=1). Raises ValueError for a malformed replay file or an unknown backend,
    ImportError when the backend's extra is not installed."""
    if replay is not None:
        from tirforge.agent.backends.replay import ReplayBackend

        turns = json.loads(replay.read_text())
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{replay}: expected a JSON list of assistant turns")
        return ReplayBackend(turns)
    from tirforge.agent.backends import make_backend

    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return make_backend(backend, model, base_url=base_url, api_key_env=api_key_env,
                        allow_network=allow_network, max_concurrency=max_batch, log=log)


def field_map(problem_field: str | None, answer_field: str | None,
              answer_format: str | None) -> FieldMap | None:
    """How to read a file dataset's rows (None: the registered datasets' own map).
    ``problem_field`` may join fields with '+'; an ``answer_field`` of '' means unlabelled."""
    if problem_field is None and answer_field is None and answer_format is None:
        return None
    answer = "answer" if answer_field is None else (answer_field or None)
    return FieldMap(
        problem=tuple(problem_field.split("+")) if problem_field else "problem",
        answer=answer,
        answer_format=answer_format or "raw",
        answer_required=answer is not None,
    )
