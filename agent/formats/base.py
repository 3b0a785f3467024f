"""What a prompt format is: it renders solve state to model input and parses model output.

A format owns three things: the chat prompt (system + user turn), how the assistant's text so far
is laid out (``render_prefix``), and how a model turn is read back (``parse_turn``). The layout
itself (fences, ```output blocks) is ``trajectories.transcript``'s, shared with training and the
apps. Feedback lines that the agent appends (reflection, answer nudge) are fixed strings of the
format, which is what lets ``parse_transcript`` split a rendered transcript back into its steps
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tirforge.trajectories import transcript
from tirforge.trajectories.grading import extract_boxed
from tirforge.trajectories.messages import to_messages
from tirforge.trajectories.schema import Step, Trajectory

TurnEvent = Literal["code", "answer", "unclosed", "no_answer"]
Reflection = Literal["error", "timeout", "restart", "empty_output", "unclosed", "no_answer"]
MessageStyle = Literal["fenced", "tool"]


@dataclass(frozen=True)
class Format:
    """A prompt format. Subclasses only change strings and whether tools exist."""

    name: str
    system_prompt: str
    tool_hint: str | None = None
    """Appended to the user turn (None: nothing)."""
    uses_tools: bool = True
    """False: the model never runs code (chain of thought only)."""
    feedback: dict[str, str] = field(default_factory=dict)
    """Reflection text per reason (see ``Reflection``), appended verbatim to the transcript."""
    decompose_prompt: str | None = None
    """Assistant text that opens a decomposition step (None: the format cannot decompose)."""
    after_decompose: str = ""
    """Appended after the decomposition, before the first solving turn."""
    stop_strings: tuple[str, ...] = ("```output",)
    """Stop sequences for servers that only take strings (the turn is cut again on parse)."""

    # -- prompt -----------------------------------------------------------------------------
    def build_messages(self, problem: str, hint: bool = True) -> list[dict]:
        """System and user turns for ``problem``."""
        user = f"{problem}\n\n{self.tool_hint}" if hint and self.tool_hint else problem
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user},
        ]

    # -- assistant transcript -----------------------------------------------------------------
    def render_step(self, step: Step) -> str:
        """One step's text, ```output block and feedback (``transcript.render_step``)."""
        return transcript.render_step(step)

    def render_prefix(self, steps: list[Step]) -> str:
        """The assistant text so far, which the model continues verbatim."""
        return transcript.render_prefix(steps)

    def stop(self, text: str) -> bool:
        """Generation stop condition: a ```python block has closed (never, without tools)."""
        return self.uses_tools and transcript.has_closed_code_block(text)

    def parse_turn(self, text: str) -> tuple[str, str | None, TurnEvent]:
        """Cut a model turn at its first closed code block; classify what the turn produced."""
        block = transcript.find_code_block(text) if self.uses_tools else None
        boxed_at = text.find("\\boxed")
        if block is not None:
            code, end = block
            if boxed_at == -1 or boxed_at > end:
                return text[:end], code, "code"
        if boxed_at != -1 and extract_boxed(text) is not None:
            return text, None, "answer"
        if self.uses_tools and transcript.has_open_code_block(text):
            return text, None, "unclosed"
        return text, None, "no_answer"

    def parse_transcript(self, text: str) -> list[Step]:
        """Split a rendered transcript back into steps (inverse of ``render_prefix``).

        Step boundaries are the end of an ```output block and the format's own feedback
        strings; a step without either is the last one.
        """
        extra = [self.after_decompose] if self.after_decompose else []
        return transcript.parse_transcript(
            text, [*self.feedback.values(), *extra], code=self.uses_tools
        )

    # -- chat renderings ----------------------------------------------------------------------
    def to_messages(
        self, messages: list[dict], steps: list[Step], style: MessageStyle = "fenced"
    ) -> list[dict]:
        """The whole trajectory as chat messages (``trajectories.messages`` layouts).

        ``fenced``: one assistant message holding the transcript (what the model saw).
        ``tool``: code outputs become ``tool`` messages; feedback opens the next assistant turn.
        """
        return to_messages(Trajectory(problem="", messages=messages, steps=steps), style)
