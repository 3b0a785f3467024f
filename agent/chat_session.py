"""One person's chat session: their kernel, their conversation, and a Stop switch.

Managed by ``agent.chat_service.ChatService``; a follow-up question carries the conversation's
earlier questions and answers in its prompt (``with_context``) while the kernel carries the
variables.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.trajectories.schema import Trajectory


class Cancelled(Exception):
    """The user pressed Stop."""


class CancellableBackend:
    """Wraps a backend so that Stop ends generation at the next token and before the next turn."""

    def __init__(self, backend: Backend, cancel: threading.Event):
        self.backend, self.cancel = backend, cancel
        self.name = getattr(backend, "name", "model")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        if self.cancel.is_set():
            raise Cancelled
        wrapped = [
            replace(r, stop=lambda t, s=r.stop: self.cancel.is_set() or (s is not None and s(t)))
            for r in requests
        ]
        out = self.backend.generate(wrapped, params)
        if self.cancel.is_set():
            raise Cancelled
        return out


@dataclass
class ChatSession:
    """One browser session: a kernel, the conversation so far, a Stop switch."""

    kernel: Any = None
    trajectories: list[Trajectory] = field(default_factory=list)
    """The conversation: one (the chosen) trajectory per question."""
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    kernel_cells: list[str] = field(default_factory=list)
    """Code whose effects the session kernel holds; replayed on the kernels of extra samples."""
    sample_kernels: list[Any] = field(default_factory=list)
    """Kernels leased for the extra samples of the question running now (Stop interrupts them)."""
    samples: list[Trajectory] = field(default_factory=list)
    """All samples of the last sampled question."""
    thread_id: str | None = None
    """Checkpointer thread of the last question's shown (chosen) trajectory."""

    def export(self) -> str | None:
        """The conversation's trajectories as a JSONL file (the collection schema): its path,
        or None before the first answer."""
        if not self.trajectories:
            return None
        path = Path(tempfile.mkdtemp(prefix="tirforge-export-")) / "conversation.jsonl"
        path.write_text("".join(t.model_dump_json() + "\n" for t in self.trajectories))
        return str(path)


def with_context(history: list[Trajectory], problem: str) -> str:
    """A follow-up question carries the earlier questions and answers of the conversation (the
    kernel already carries the variables)."""
    if not history:
        return problem
    lines = ["Earlier in this conversation (the Python session still holds its variables):"]
    for t in history[-4:]:
        lines.append(f"- Question: {t.problem}\n  Answer: {t.final_answer or '(none)'}")
    return "\n".join(lines) + f"\n\nNew question: {problem}"


def last_question(prompt: str) -> str:
    """The user's own question inside a follow-up prompt built by ``with_context``."""
    marker = "\n\nNew question: "
    return prompt.rsplit(marker, 1)[-1] if marker in prompt else prompt
