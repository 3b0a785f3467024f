"""The transcript layout: how a trajectory's assistant text is written, and how it is read back.

The whole solution is ONE assistant message that the model continues (Qwen2.5-Math TIR layout):
prose, a ```python block, the executor's output spliced in as a ```output block, any feedback
line the agent appended, the next prose, and so on. Every reader and writer of that text uses
this module: the prompt formats (``agent.formats``), the chat renderings for training
(``trajectories.messages``), the CLI and the chat app.

Fences are parsed strictly: only a block that opens with ```python (or ```py, any case) and a
line break, and closes with ``` on a line of its own, counts as code; a ``` inside a line of
code (a string literal) does not close it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tirforge.trajectories.schema import Step

CODE_OPEN = re.compile(r"```(?:python|py)[ \t]*\n", re.IGNORECASE)
"""The opening fence of a code block: ```python or ```py, then the end of the line."""
_CODE_CLOSE = re.compile(r"\n[ \t]*```[ \t]*(?:\n|$)")
OUTPUT_HEAD = "\n```output\n"
OUTPUT_TAIL = "\n```\n"
_OUTPUT_BLOCK = re.compile(r"\n```output\n.*?\n```\n", re.DOTALL)


# -- code blocks ------------------------------------------------------------------------------
def find_code_block(text: str) -> tuple[str, int] | None:
    """(code, end offset just past the closing ```) of the first closed ```python block of
    ``text``, or None when no block has both fences."""
    m = CODE_OPEN.search(text)
    if m is None:
        return None
    c = _CODE_CLOSE.search(text, m.end() - 1)
    if c is None:
        return None
    return text[m.end() : c.start()], c.start() + len(c.group(0).rstrip("\n"))


def code_block_start(text: str) -> int | None:
    """Offset of the first ```python opening fence (closed or not), or None."""
    m = CODE_OPEN.search(text)
    return None if m is None else m.start()


def split_prose(text: str) -> tuple[str, str]:
    """(the prose before the first ```python fence, the rest from that fence on)."""
    at = code_block_start(text)
    return (text, "") if at is None else (text[:at], text[at:])


def has_closed_code_block(text: str) -> bool:
    """Generation's stop condition: a ```python block has been closed."""
    return find_code_block(text) is not None


def has_open_code_block(text: str) -> bool:
    """True if a ```python block was opened and never closed."""
    m = CODE_OPEN.search(text)
    return m is not None and _CODE_CLOSE.search(text, m.end() - 1) is None


# -- writing ----------------------------------------------------------------------------------
def render_output(output: str) -> str:
    """The ```output block placed after a code block."""
    return OUTPUT_HEAD + output + OUTPUT_TAIL


def render_pieces(steps: Iterable[Step]) -> list[tuple[str, bool]]:
    """The transcript of ``steps`` as (text, written by the model) pieces, in order: each step's
    text (model), its ```output block (executor) and its feedback (agent)."""
    pieces: list[tuple[str, bool]] = []
    for s in steps:
        pieces.append((s.text, True))
        if s.output is not None:
            pieces.append((render_output(s.output), False))
        if s.feedback:
            pieces.append((s.feedback, False))
    return pieces


def render_step(step: Step) -> str:
    """One step's part of the transcript: its text, ```output block and feedback."""
    return "".join(text for text, _ in render_pieces([step]))


def render_prefix(steps: Iterable[Step]) -> str:
    """The assistant text of ``steps`` so far, which the model continues verbatim."""
    return "".join(text for text, _ in render_pieces(steps))


# -- reading ----------------------------------------------------------------------------------
def split_output_blocks(content: str) -> list[tuple[str, bool]]:
    """Assistant text cut into (text, is an ```output block) pieces, in order, empty pieces
    dropped. Exact for text ``render_prefix`` wrote; an output that itself holds a "\\n```\\n"
    line ends its block early."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for b in _OUTPUT_BLOCK.finditer(content):
        pieces += [(content[pos : b.start()], False), (b.group(0), True)]
        pos = b.end()
    pieces.append((content[pos:], False))
    return [p for p in pieces if p[0]]


def parse_transcript(text: str, feedbacks: Iterable[str] = (), code: bool = True) -> list[Step]:
    """Split a rendered transcript back into steps (the inverse of ``render_prefix``).

    Step boundaries are the end of an ```output block and the ``feedbacks`` (the fixed lines the
    agent appends); a step without either is the last one. ``code=False`` for transcripts of a
    format without tools (no block is code). Raises ValueError on an unclosed ```output block.
    """
    fbs = sorted({f for f in feedbacks if f}, key=len, reverse=True)
    steps: list[Step] = []
    rest = text
    while rest:
        block = find_code_block(rest) if code else None
        end = block[1] if block else len(rest) + 1
        fb_at, fb = min(
            ((rest.find(f), f) for f in fbs if 0 <= rest.find(f) < end), default=(-1, "")
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
        if rest.startswith(OUTPUT_HEAD):
            close = rest.find(OUTPUT_TAIL, len(OUTPUT_HEAD) - 1)
            if close < 0:
                raise ValueError("unclosed ```output block in transcript")
            step.output = rest[len(OUTPUT_HEAD) : close]
            rest = rest[close + len(OUTPUT_TAIL) :]
        fb = next((f for f in fbs if rest.startswith(f)), None)
        if fb is not None:
            step.feedback, rest = fb, rest[len(fb) :]
        steps.append(step)
    return steps
