"""Turn a trajectory into OpenAI-style chat messages, in one of two layouts.

``fenced`` (Qwen2.5-Math TIR): the prompt, then ONE assistant message holding the whole solution,
with each executor output spliced in as a ```output block after the code that produced it. This is
the text the agent's model continues at inference time; its layout is ``trajectories.transcript``.

``tool``: the prompt, then assistant turns that end with their code block, each followed by a
``tool`` message with the executor output; the assistant continues in a new turn.

Environment feedback (the agent's reflect / nudge text, ``Step.feedback``) is written into the
assistant text as the agent does at inference: it is not model-written, so ``to_segments`` marks
it, like every executor output, as not trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tirforge.trajectories.transcript import (
    render_output,
    render_pieces,
    render_prefix,
    split_output_blocks,
)

if TYPE_CHECKING:
    from tirforge.trajectories.schema import Trajectory

Style = Literal["tool", "fenced"]
STYLES: tuple[str, ...] = ("tool", "fenced")
__all__ = [
    "STYLES", "Segment", "SegmentedMessage", "Style", "render_output", "render_prefix",
    "segments_from_messages", "to_messages", "to_segments",
]


@dataclass
class Segment:
    """A piece of message content; ``trainable`` marks model-written text."""

    text: str
    trainable: bool


@dataclass
class SegmentedMessage:
    """A chat message whose content is split into trainable and non-trainable pieces."""

    role: str
    segments: list[Segment]

    @property
    def content(self) -> str:
        return "".join(s.text for s in self.segments)

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def _prompt(traj: Trajectory) -> list[SegmentedMessage]:
    if not traj.messages:
        raise ValueError(
            f"trajectory {traj.id} has no prompt messages; training needs the exact model input"
        )
    out = []
    for m in traj.messages:
        if m.get("role") not in ("system", "user") or not isinstance(m.get("content"), str):
            raise ValueError(
                f"trajectory {traj.id}: prompt messages must be system/user with string "
                f"content, got {m!r}"
            )
        out.append(SegmentedMessage(m["role"], [Segment(m["content"], False)]))
    return out


def to_segments(traj: Trajectory, style: Style = "tool") -> list[SegmentedMessage]:
    """The messages of ``to_messages`` with each content split into trainable pieces."""
    if style not in STYLES:
        raise ValueError(f"unknown message style {style!r}; expected one of {STYLES}")
    msgs = _prompt(traj)
    if style == "fenced":
        segs = [Segment(t, ok) for t, ok in render_pieces(traj.steps) if t]
        if segs:
            msgs.append(SegmentedMessage("assistant", segs))
        return msgs
    current: list[Segment] = []
    for s in traj.steps:
        if s.text:
            current.append(Segment(s.text, True))
        if s.output is not None:
            # The tool message answers the assistant turn that ended with the code block.
            msgs.append(SegmentedMessage("assistant", current or [Segment("", True)]))
            msgs.append(SegmentedMessage("tool", [Segment(s.output, False)]))
            current = []
        if s.feedback:
            current.append(Segment(s.feedback, False))
    if current:
        msgs.append(SegmentedMessage("assistant", current))
    return msgs


def to_messages(traj: Trajectory, style: Style = "tool") -> list[dict]:
    """OpenAI chat messages for ``traj``: its prompt, then its steps in ``style`` layout."""
    return [m.to_dict() for m in to_segments(traj, style)]


def segments_from_messages(messages: list[dict]) -> list[SegmentedMessage]:
    """Segment plain chat messages (e.g. a dataset's ``messages`` column) for masking.

    Assistant content is model-written except ```output blocks inside it; every other role
    (system, user, tool) is not. Exact for text ``to_messages`` wrote; for foreign data an output
    that itself contains a "\\n```\\n" line ends its block early, so prefer Trajectory records.
    """
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {i} needs string role and content, got {m!r}")
        if role != "assistant":
            out.append(SegmentedMessage(role, [Segment(content, False)]))
            continue
        segs = [Segment(text, not output) for text, output in split_output_blocks(content)]
        out.append(SegmentedMessage(role, segs or [Segment("", True)]))
    return out
