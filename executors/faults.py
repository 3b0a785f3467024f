"""Naming the kind of failure a cell met, from what the kernel and the sandbox report."""

from __future__ import annotations

import signal

from tirforge.executors.result import ExecutionResult, Fault

# errno values in an OSError's message ("[Errno 28] No space left on device").
_DISK_ERRNOS = ("[Errno 28]", "[Errno 27]", "[Errno 122]")  # ENOSPC, EFBIG, EDQUOT
_PROCESS_MARKERS = ("[Errno 11]", "can't start new thread")  # EAGAIN from fork/clone


def classify(
    res: ExecutionResult,
    *,
    died: bool,
    died_signal: int | None = None,
    oom_killed: bool = False,
    truncated: bool = False,
) -> Fault | None:
    """The fault of a finished cell.

    ``died``: the kernel process ended during the cell; ``died_signal``: the signal that ended
    it, if known; ``oom_killed``: the sandbox's memory cgroup counted an OOM kill meanwhile;
    ``truncated``: some output was cut at ``max_output_chars``. Limits win over the generic
    kinds: a MemoryError is ``memory``, not ``error``.
    """
    if died:
        if oom_killed:
            return "memory"
        if died_signal == signal.SIGXCPU:
            return "cpu"
        if died_signal == signal.SIGXFSZ:
            return "disk"
        return "timeout" if res.timed_out else "kernel_died"
    if res.timed_out:
        return "timeout"
    name, value = res.error_name, f"{res.error_value or ''} {res.traceback or ''}"
    if name is not None:
        if name == "MemoryError":
            return "memory"
        if name in ("BlockingIOError", "RuntimeError", "OSError") and any(
            m in value for m in _PROCESS_MARKERS
        ):
            return "processes"
        if any(m in value for m in _DISK_ERRNOS):
            return "disk"
        return "error"
    return "output" if truncated else None
