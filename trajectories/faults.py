"""Counting what went wrong in the cells of many trajectories, by kind of fault."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tirforge.executors.result import INFRA_FAULTS
from tirforge.trajectories.schema import Trajectory


def fault_counts(trajectories: Iterable[Trajectory]) -> dict[str, int]:
    """How many executed cells met each fault kind (``ExecutionResult.fault``), e.g.
    ``{"error": 12, "timeout": 3, "memory": 1}``; clean cells and steps without code are not
    counted. Rows written before faults were recorded count as clean."""
    counts: Counter[str] = Counter(
        s.fault for t in trajectories for s in t.steps if s.fault is not None
    )
    return dict(sorted(counts.items()))


def has_infra_fault(trajectory: Trajectory) -> bool:
    """True if a cell failed for the machinery's sake (kernel died or did not start, no
    sandbox): such a trajectory says nothing about the model, so selection and RL should
    retry or drop it rather than learn from it."""
    return any(s.fault in INFRA_FAULTS for s in trajectory.steps)
