"""What a kernel's namespace holds after a trajectory's cells ran: the code that rebuilds it.

A trajectory that moves to another kernel (a step-search candidate on a shared kernel, a chat
sample on a kernel of its own) gets its variables back by running these cells again -- the
fallback where the executor cannot fork (``Executor.fork`` carries the state itself, without
re-running anything). Replays recompute rather than restore: deterministic code gives the same
state, unseeded randomness or clock reads may not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tirforge.trajectories.schema import Step


def replay_cells(steps: Iterable[Step], before: Sequence[str] = ()) -> list[str]:
    """The cells that rebuild the namespace of a kernel that ran ``before`` and then the cells
    of ``steps``, in order. A kernel restart wiped everything before it, so the list starts
    over; a cell that timed out is left out (replaying it would only wait the full timeout
    again), so its partial side effects are lost. Steps without code or not yet run add
    nothing."""
    cells = list(before)
    for step in steps:
        res = step.execution
        if res is None or step.code is None:
            continue
        if res.restarted:
            cells = []
        elif not res.timed_out:
            cells.append(step.code)
    return cells
