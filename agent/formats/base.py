"""What a prompt format is: it renders solve state to model input and parses model output.

A format owns three things: the chat prompt (system + user turn), how the assistant's text so far
is laid out (``render_prefix``), and how a model turn is read back (``parse_turn``). Feedback
lines that the agent appends (reflection, answer nudge) are fixed strings of the format, which is
what lets ``parse_transcript`` split a rendered transcript back into its steps exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tirforge.agent import format as fence
from tirforge.trajectories.grading import extract_boxed
from tirforge.trajectories.schema import Step

TurnEvent = Literal["code", "answer", "unclosed", "no_answer"]
Reflection = Literal["error", "timeout", "restart", "empty_output", "unclosed", "no_answer"]
MessageStyle = Literal["fenced", "tool"]

_OUTPUT_HEAD = "\n```output\n"
_OUTPUT_TAIL = "\n```\n"


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
        text = step.text
        if step.output is not None:
            text += _OUTPUT_HEAD + step.output + _OUTPUT_TAIL
        return text + (step.feedback or "")

    def render_prefix(self, steps: list[Step]) -> str:
        """The assistant text so far, which the model continues verbatim."""
        return "".join(self.render_step(s) for s in steps)

    def stop(self, text: str) -> bool:
        """Generation stop condition: a ```python block has closed (never, without tools)."""
        return self.uses_tools and fence.has_closed_code_block(text)

    def parse_turn(self, text: str) -> tuple[str, str | None, TurnEvent]:
        """Cut a model turn at its first closed code block; classify what the turn produced."""
        block = fence.find_code_block(text) if self.uses_tools else None
        boxed_at = text.find("\\boxed")
        if block is not None:
            code, end = block
            if boxed_at == -1 or boxed_at > end:
                return text[:end], code, "code"
        if boxed_at != -1 and extract_boxed(text) is not None:
            return text, None, "answer"
        if self.uses_tools and fence.has_open_code_block(text):
            return text, None, "unclosed"
        return text, None, "no_answer"

    def parse_transcript(self, text: str) -> list[Step]:
        """Split a rendered transcript back into steps (inverse of ``render_prefix``).

        Step boundaries are the end of an ```output block and the format's own feedback
        strings; a step without either is the last one.
        """
        feedbacks = sorted(
            {*self.feedback.values(), *([self.after_decompose] if self.after_decompose else [])},
            key=len,
            reverse=True,
        )
        steps: list[Step] = []
        rest = text
        while rest:
            block = fence.find_code_block(rest) if self.uses_tools else None
            end = block[1] if block else len(rest) + 1
            fb_at, fb = min(
                ((rest.find(f), f) for f in feedbacks if 0 <= rest.find(f) < end),
                default=(-1, ""),
            )
            if fb_at >= 0:  # a feedback line comes before any closed code: a no-code step
                steps.append(Step(text=rest[:fb_at], feedback=fb))
                rest = rest[fb_at + len(fb) :]
                continue
            if block is None:
                steps.append(Step(text=rest))
                break
            step = Step(text=rest[:end], code=block[0])
            rest = rest[end:]
            if rest.startswith(_OUTPUT_HEAD):
                close = rest.find(_OUTPUT_TAIL, len(_OUTPUT_HEAD) - 1)
                if close < 0:
                    raise ValueError("unclosed ```output block in transcript")
                step.output = rest[len(_OUTPUT_HEAD) : close]
                rest = rest[close + len(_OUTPUT_TAIL) :]
            fb = next((f for f in feedbacks if rest.startswith(f)), None)
            if fb is not None:
                step.feedback, rest = fb, rest[len(fb) :]
            steps.append(step)
        return steps

    # -- chat renderings ----------------------------------------------------------------------
    def to_messages(
        self, messages: list[dict], steps: list[Step], style: MessageStyle = "fenced"
    ) -> list[dict]:
        """The whole trajectory as chat messages (``trajectories.messages`` layouts).

        ``fenced``: one assistant message holding the transcript (what the model saw).
        ``tool``: code outputs become ``tool`` messages; feedback opens the next assistant turn.
        """
        from tirforge.trajectories.messages import to_messages
        from tirforge.trajectories.schema import Trajectory

        return to_messages(Trajectory(problem="", messages=messages, steps=steps), style)
