"""What running one cell returned, and how the model sees it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TRACEBACK_TAIL_LINES = 5


def strip_ansi(s: str) -> str:
    """Remove terminal colour codes (IPython colours its tracebacks)."""
    return _ANSI.sub("", s)


def truncate(s: str, max_chars: int) -> str:
    """Keep the head and tail of a long text, with a marker saying how much was cut."""
    if len(s) <= max_chars:
        return s
    # The marker's own length depends on the count; a generous estimate keeps us under max_chars.
    keep = max(max_chars - len(f"\n...[truncated {len(s)} chars]...\n"), 0)
    head, tail = s[: keep - keep // 2], s[len(s) - keep // 2 :]
    return f"{head}\n...[truncated {len(s) - keep} chars]...\n{tail}"


Fault = Literal[
    "error",
    "timeout",
    "memory",
    "processes",
    "disk",
    "output",
    "cpu",
    "kernel_died",
    "start_failed",
    "sandbox_unavailable",
]
"""Which kind of failure a cell met (see ``ExecutionResult.fault``)."""
#: Faults where the cell hit a per-kernel limit.
RESOURCE_FAULTS: frozenset[str] = frozenset({"memory", "processes", "disk", "output", "cpu"})
#: Faults of the machinery, not of the model's code: a trajectory with one says nothing about
#: the model (selection / RL should drop or retry it rather than learn from it).
INFRA_FAULTS: frozenset[str] = frozenset({"kernel_died", "start_failed", "sandbox_unavailable"})


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (no bubblewrap, no Docker daemon or image); the message
    says how to get it. ``run`` reports it as ``fault="sandbox_unavailable"``."""


class ForkFailed(RuntimeError):
    """``Executor.fork()`` could not branch the kernel. ``fault`` says why, as a cell's would:
    ``"kernel_died"`` (the kernel to fork is dead) or ``"start_failed"`` (the fork did not
    come up). Callers fall back to replaying cells."""

    def __init__(self, message: str, fault: Fault = "start_failed"):
        super().__init__(message)
        self.fault: Fault = fault


class ExecutionResult(BaseModel):
    """The outcome of one cell in a kernel."""

    # PNG bytes travel as base64 in JSON (trajectory files, the chat app).
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    stdout: str = ""
    """Everything the cell wrote to stdout (print), in order."""
    stderr: str = ""
    """Everything the cell wrote to stderr (warnings, logging)."""
    result: str | None = None
    """text/plain repr of the cell's value (its last expression), as Jupyter's Out[n]."""
    display_text: list[str] = []
    """text/plain of each display_data message (display(x), a figure's repr), in order."""
    images: list[bytes] = []
    """PNG images the cell displayed (e.g. matplotlib figures), raw bytes."""
    error_name: str | None = None
    """Exception class name, e.g. "NameError"; "KernelDied" if the kernel process died."""
    error_value: str | None = None
    """The exception's message, e.g. "name 'x' is not defined"."""
    traceback: str | None = None
    """The full traceback, lines joined with newlines, ANSI colour codes stripped."""
    timed_out: bool = False
    """The cell ran past its timeout and was interrupted."""
    timeout_s: float | None = None
    """The time limit the cell ran under (seconds)."""
    restarted: bool = False
    """The kernel was restarted while running this cell: every variable was lost."""
    duration_s: float = 0.0
    """Wall-clock seconds from sending the cell to having its outcome."""
    fault: Fault | None = None
    """What went wrong, by kind; None for a clean cell. ``error``: the code raised;
    ``timeout``: it ran past ``timeout_s``; a limit (``memory``, ``processes``, ``disk``,
    ``output`` -- the output was truncated, the cell may still be ``ok`` --, ``cpu``); or the
    machinery (``kernel_died`` without hitting a limit, ``start_failed``,
    ``sandbox_unavailable``). Old results (before this field) load as None."""

    @property
    def ok(self) -> bool:
        """The cell finished in time without raising."""
        return self.error_name is None and not self.timed_out

    def to_text(self, max_chars: int = 2000) -> str:
        """The text placed in the ```output block: what a person would see under the cell."""
        parts = [p for p in (self.stdout, self.stderr) if p]
        parts += self.display_text
        if self.result is not None:
            parts.append(self.result)
        if self.error_name is not None and self.traceback:
            # The tail holds the failing line and "Name: value", which is what the model needs.
            lines = self.traceback.strip().splitlines()
            parts.append("\n".join(lines[-_TRACEBACK_TAIL_LINES:]))
        elif self.error_name is not None:
            parts.append(f"{self.error_name}: {self.error_value or ''}".rstrip(": "))
        if self.timed_out:
            limit = f" {self.timeout_s:g}s" if self.timeout_s is not None else " its time limit"
            parts.append(f"TimeoutError: cell exceeded{limit} and was interrupted")
        if self.restarted:
            parts.append("The kernel was restarted; all variables were lost.")
        return truncate("\n".join(p.rstrip("\n") for p in parts), max_chars)
