"""Agent state rendered as Gradio chat messages: prose, collapsible code cells with their
output, inline plots, reflections, the final answer as LaTeX, and the summary of N samples.
Pure functions, unit-tested without a browser (``apps.chat`` streams them)."""

import re
import uuid
from pathlib import Path
from typing import Any

from tirforge.trajectories.metrics import group_answers
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.transcript import split_prose

Message = dict[str, Any]
SCORED = ("best-of-n", "weighted-majority")
"""Strategies that rate samples with a scorer (the others only count answers)."""
NO_RM = "scored by execution heuristics (no RM loaded)"


_BARE_BOX = re.compile(r"(?<![$\\(\[])\\boxed\{([^{}$]*)\}(?![$])")


def _math_boxes(text: str) -> str:
    """Models often write \\boxed{..} outside math mode; render it as math anyway."""
    return _BARE_BOX.sub(r"$\\boxed{\1}$", text)


def step_messages(step: Step, index: int, image_dir: str | None = None) -> list[Message]:
    """Chat messages for one model turn: its prose, its code cell with the kernel's output (a
    collapsible block), images the cell displayed, and any self-correction note."""
    out: list[Message] = []
    prose = split_prose(step.text)[0] if step.code is not None else step.text
    if prose.strip():
        out.append({"role": "assistant", "content": _math_boxes(prose.strip())})
    if step.code is not None:
        body = f"```python\n{step.code.rstrip()}\n```"
        res = step.execution
        if res is None:
            title, status = f"Code cell {index} — running…", "pending"
        else:
            status = "done"
            if res.restarted:
                title = f"Code cell {index} — kernel restarted, variables lost"
            elif res.timed_out:
                title = f"Code cell {index} — timed out"
            elif res.error_name:
                title = f"Code cell {index} — {res.error_name}"
            else:
                title = f"Code cell {index}"
            body += f"\n\n**Output**\n```output\n{step.output or '(no output)'}\n```"
        out.append(
            {"role": "assistant", "content": body, "metadata": {"title": title, "status": status}}
        )
        if res is not None and res.images and image_dir is not None:
            for j, png in enumerate(res.images):
                path = Path(image_dir) / f"{uuid.uuid4().hex}-{index}-{j}.png"
                path.write_bytes(png)
                out.append({"role": "assistant", "content": {"path": str(path)}})
    if step.feedback and step.feedback.strip():
        out.append(
            {
                "role": "assistant",
                "content": step.feedback.strip(),
                "metadata": {"title": "Self-correction", "status": "done"},
            }
        )
    return out


def answer_message(final_answer: str | None, stop_reason: str | None) -> Message:
    """The highlighted final answer, or a clear note on why there is none."""
    if final_answer is not None:
        return {"role": "assistant", "content": f"### Final answer: $\\boxed{{{final_answer}}}$"}
    why = {
        "max_turns": "it used up its turn budget",
        "unclosed_code": "its last code block was never closed",
        "no_answer": "it stopped without stating one",
        "cancelled": "you stopped it",
    }.get(stop_reason or "", stop_reason or "it stopped")
    return {"role": "assistant", "content": f"**No final answer**: {why}."}


def turn_messages(
    problem: str,
    steps: list[Step],
    *,
    live_text: str = "",
    final: tuple[str | None, str | None] | None = None,
    image_dir: str | None = None,
) -> list[Message]:
    """All messages of one question: the user's problem, each step, the text being generated
    right now (``live_text``), and the answer once ``final`` = (answer, stop reason) is known."""
    msgs: list[Message] = [{"role": "user", "content": problem}]
    for i, step in enumerate(steps, 1):
        msgs += step_messages(step, i, image_dir)
    if live_text.strip():
        msgs.append({"role": "assistant", "content": live_text})
    if final is not None:
        msgs.append(answer_message(*final))
    return msgs


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def samples_summary(
    samples: list[Trajectory], chosen: int, strategy: str, scorer_label: str = NO_RM,
    note: str = "",
) -> Message:
    """A collapsible message: every sample's answer, votes and score, which one was picked and
    why (its votes or its score)."""
    n = len(samples)
    groups = group_answers([t.final_answer for t in samples])
    votes = [groups.count(g) if g >= 0 else 0 for g in groups]
    pick = samples[chosen]
    answer = f"${pick.final_answer}$" if pick.final_answer is not None else "no answer"
    if groups[chosen] < 0:
        why = "no sample answered, so the first is shown"
    elif strategy == "majority":
        why = f"{answer} got {votes[chosen]} of {n} votes"
    elif strategy == "weighted-majority":
        total = sum(t.score or 0.0 for t, g in zip(samples, groups, strict=True)
                    if g == groups[chosen])
        why = f"{answer} has the highest total score, {total:.2f}"
    else:
        why = f"highest score, {pick.score or 0.0:.2f}"
    scored = any(t.score is not None for t in samples)
    rows = ["| sample | answer | votes | score | |", "|---|---|---|---|---|"]
    for i, t in enumerate(samples):
        shown = f"${_cell(t.final_answer)}$" if t.final_answer is not None else "—"
        score = f"{t.score:.2f}" if scored and t.score is not None else "—"
        mark = "**picked**" if i == chosen else ""
        rows.append(f"| {i + 1} | {shown} | {votes[i]} | {score} | {mark} |")
    lines = ["\n".join(rows)]
    if strategy in SCORED:
        lines.append(f"Samples {scorer_label}.")
    if note:
        lines.append(note)
    return {
        "role": "assistant",
        "content": "\n\n".join(lines),
        "metadata": {
            "title": f"{strategy}: picked sample {chosen + 1} of {n} — {why}",
            "status": "done",
        },
    }
