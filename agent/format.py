"""The Qwen2.5-Math TIR text format: prose, ```python blocks, then ```output blocks.

The whole trajectory is one assistant message that the model continues; the executor's output
is spliced in after each code block. Parsing is deliberately strict about fences: only a block
that opens with ```python (or ```py) and closes with ``` on its own line is run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tirforge.trajectories.schema import Step

SYSTEM_PROMPT = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)

# Qwen2.5-Math puts the instruction in the system turn; small general models follow it better
# with an explicit reminder of the mechanics, which costs ~40 tokens.
TOOL_HINT = (
    "Write Python code in a ```python block; it will be run and its output shown to you in an "
    "```output block. Then state the final answer within \\boxed{}."
)

REFLECT_ERROR = (
    "The code above raised an error. Let me read the error message, fix the code and run it again."
)
REFLECT_TIMEOUT = "The code above took too long. Let me write a faster version."
REFLECT_RESTART = (
    "The kernel was restarted, so every variable defined so far is lost. "
    "Let me redefine what I need."
)
REFLECT_UNCLOSED = (
    "\n```\nThe code block above was not closed with ```, so it did not run. "
    "Let me write it again, complete and closed."
)
REFLECT_NO_ANSWER = "\nSo the final answer is \\boxed{"

_OPEN = re.compile(r"```(?:python|py)[ \t]*\n", re.IGNORECASE)
_CLOSE = re.compile(r"\n[ \t]*```[ \t]*(?:\n|$)")


def find_code_block(text: str) -> tuple[str, int] | None:
    """Return (code, end offset) of the first closed ```python block, or None."""
    m = _OPEN.search(text)
    if m is None:
        return None
    c = _CLOSE.search(text, m.end() - 1)
    if c is None:
        return None
    end = c.start() + c.group(0).rstrip("\n").__len__()
    return text[m.end() : c.start()], end


def has_closed_code_block(text: str) -> bool:
    """Stop condition for generation: a ```python block has been closed."""
    return find_code_block(text) is not None


def has_open_code_block(text: str) -> bool:
    """True if a ```python block was opened and never closed."""
    m = _OPEN.search(text)
    return m is not None and _CLOSE.search(text, m.end() - 1) is None


def render_output(output: str) -> str:
    """The ```output block placed after a code block (Qwen2.5-Math TIR layout)."""
    return f"\n```output\n{output}\n```\n"


def render_step(step: Step) -> str:
    text = step.text
    if step.output is not None:
        text += render_output(step.output)
    if step.feedback:
        text += step.feedback
    return text


def render_prefix(steps: list[Step]) -> str:
    """The assistant text so far, which the model continues."""
    return "".join(render_step(s) for s in steps)


def build_messages(problem: str, system_prompt: str = SYSTEM_PROMPT, hint: bool = True) -> list:
    """Chat messages for a problem: Qwen2.5-Math's system prompt, the problem as user turn."""
    user = f"{problem}\n\n{TOOL_HINT}" if hint else problem
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
