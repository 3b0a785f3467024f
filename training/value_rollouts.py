"""Value targets from fresh rollouts: which step prefixes to roll out from, the cache of their
outcomes, and how rollout outcomes and logged outcomes make one target.

The rollouts themselves (the policy continuing the TIR loop from a prefix, on a kernel restored
to the prefix's state) are agent work: ``agent.pipelines.value_targets``. This module only
names prefixes, stores what the rollouts found and turns it into targets, so ``training`` never
imports the agent.

Mixing rule (``combine_targets``), for the state "problem + first k steps" of a trajectory:

* ``rollouts`` — the share of correct finishes among the K fresh rollouts from that state.
* ``pool`` — every finish seen from that state counts once: the K rollouts plus the logged
  trajectories that share the prefix (``value_data.mc_counts``), i.e.
  ``(correct_rollouts + correct_logged) / (K + n_logged)``. Both are Monte-Carlo samples of
  the same return; the logged ones come from the collection policy, the fresh ones from the
  rollout policy (the same model unless ``rollout_model`` says otherwise).

A prefix not rolled out (sampled away by ``max_prefixes_per_problem``, a cache miss that
failed, or the last step, whose state is finished) keeps its logged Monte-Carlo target.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tirforge.training.value_data import mc_counts, prefix_hash, problem_key, step_key
from tirforge.trajectories.schema import Trajectory

Mix = Literal["pool", "rollouts"]
CacheKey = tuple[str, str, int, str]
"""(problem key, prefix hash, K, settings hash)."""


@dataclass(frozen=True)
class Prefix:
    """A state to roll out from: the first ``k`` steps (1 <= k < len(steps)) of ``traj``."""

    traj: Trajectory
    k: int

    @property
    def problem(self) -> str:
        return problem_key(self.traj)

    @property
    def hash(self) -> str:
        return prefix_hash(self.traj, self.k)


@dataclass
class RolloutRecord:
    """What the K rollouts from one prefix found (one JSONL line of the cache)."""

    problem: str
    prefix: str
    """``value_data.prefix_hash`` of the state."""
    k: int
    """Rollouts run (K)."""
    settings: str
    """Hash of the rollout settings (policy, sampling, budgets): another policy's outcomes are
    never reused."""
    correct: int
    """Rollouts graded correct."""
    verdicts: list[str | None] = field(default_factory=list)
    """Each rollout's verdict (``trajectories.grading``)."""
    steps: int = 0
    """Steps in the prefix."""
    seconds: float = 0.0
    """Wall time of the prefix's restore + K rollouts."""
    replayed_cells: int = 0
    """Cells re-run to restore kernels: the prefix's cells once per rollout without fork, once
    in all with fork."""
    forked: bool = False
    """The K kernels were forks of one kernel that ran the prefix (else each replayed it)."""

    @property
    def key(self) -> CacheKey:
        return (self.problem, self.prefix, self.k, self.settings)


def select_prefixes(trajs: list[Trajectory], max_per_problem: int = 0,
                    seed: int = 0) -> list[Prefix]:
    """The distinct states to roll out from: every step prefix (k < len(steps)) of every graded
    trajectory, one per state (trajectories sharing a prefix share its rollouts), at most
    ``max_per_problem`` per problem (0: all), drawn at random with ``seed``. Order: by problem,
    then as drawn. A finished trajectory's full prefix is never listed: its value is its
    verdict."""
    if max_per_problem < 0:
        raise ValueError("max_prefixes_per_problem must be >= 0 (0: every prefix)")
    by_problem: dict[str, dict[tuple, Prefix]] = {}
    for t in trajs:
        if t.verdict is None:
            continue
        seen = by_problem.setdefault(problem_key(t), {})
        keys = tuple(step_key(s) for s in t.steps)
        for k in range(1, len(keys)):
            seen.setdefault(keys[:k], Prefix(t, k))
    rng = random.Random(seed)
    out: list[Prefix] = []
    for states in by_problem.values():
        cands = list(states.values())
        if max_per_problem and len(cands) > max_per_problem:
            cands = rng.sample(cands, max_per_problem)
        out += cands
    return out


def combine_targets(trajs: list[Trajectory], records: dict[tuple[str, str], RolloutRecord],
                    mix: Mix = "pool") -> dict[str, list[float]]:
    """Trajectory id -> the value target after each step: ``records`` ((problem, prefix hash)
    -> what the rollouts found) mixed with the logged Monte-Carlo counts by ``mix`` (see the
    module docstring); a step without a record keeps the logged share."""
    if mix not in ("pool", "rollouts"):
        raise ValueError(f"rollout_mix must be 'pool' or 'rollouts', not {mix!r}")
    counts = mc_counts(trajs)
    by_id = {t.id: t for t in trajs}
    out: dict[str, list[float]] = {}
    for tid, cs in counts.items():
        t, vals = by_id[tid], []
        for k, (c, n) in enumerate(cs, start=1):
            rec = records.get((problem_key(t), prefix_hash(t, k))) if k < len(cs) else None
            if rec is None:
                vals.append(c / n)
            elif mix == "rollouts":
                vals.append(rec.correct / rec.k)
            else:
                vals.append((rec.correct + c) / (rec.k + n))
        out[tid] = vals
    return out


class RolloutCache:
    """Append-only JSONL of ``RolloutRecord``s, so a killed run resumes without redoing finished
    prefixes. Each record goes out as one ``os.write`` of a complete line (``O_APPEND``, fsync);
    a torn last line (kill -9 mid-write) is skipped by readers and its prefix redone. One writer
    at a time: ``open`` takes an exclusive ``flock`` on the file and raises RuntimeError while
    another run holds it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def read(self) -> dict[CacheKey, RolloutRecord]:
        """Every complete record (the first of a key wins)."""
        out: dict[CacheKey, RolloutRecord] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_bytes().split(b"\n"):
            try:
                rec = RolloutRecord(**json.loads(line))
            except (ValueError, TypeError):  # a torn tail, or an empty line
                continue
            out.setdefault(rec.key, rec)
        return out

    def open(self) -> RolloutCache:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(f"{self.path}: another run is writing these rollout "
                                   "targets; wait for it or use another rollout_cache") from None
            # A torn tail from a killed run: start the next record on a line of its own.
            if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
                os.write(fd, b"\n")
            self._fd = fd
        return self

    def add(self, rec: RolloutRecord) -> None:
        self.open()
        assert self._fd is not None
        os.write(self._fd, (json.dumps(asdict(rec), separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RolloutCache:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
