"""The trajectory record: one model's attempt at one problem, step by step.

A trajectory is what every stage of tirforge exchanges: the agent writes it, the store keeps it,
grading labels it and training reads it. One JSON object per line on disk.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tirforge.executors.result import ExecutionResult

StopReason = Literal[
    "answer", "max_turns", "max_tokens", "max_time", "no_answer", "unclosed_code", "error"
]


class Step(BaseModel):
    """One model turn and what the environment answered.

    Rendered into the assistant text as ``text`` + `````output`` block + ``feedback``.
    """

    text: str
    """What the model generated this turn; ends right after the closing code fence, if any."""
    code: str | None = None
    """The Python code taken from the closed ```python block of ``text`` (None: no code)."""
    execution: ExecutionResult | None = None
    """What the kernel returned for ``code``."""
    output: str | None = None
    """The execution rendered as the model sees it inside the ```output block."""
    feedback: str | None = None
    """A reflect / self-correction instruction appended after the output (None: none)."""
    gen_s: float = 0.0
    """Seconds spent generating ``text``."""
    token_ids: list[int] | None = None
    """The token ids the model sampled this turn, verbatim, as the backend returned them
    (``Completion.token_ids``; a turn the model ended keeps its EOS). The transformers and vLLM
    engines stop on the token that closes a code block; a server that stops on strings may
    return a few more, which ``trajectories.tokens.turn_ids`` cuts after the token that
    completed ``text`` for both the next turn's prompt and training. None: the backend did not
    report them. GRPO trains on these, never on a re-tokenisation of ``text``."""
    sampled_from: int = 0
    """Offset in ``text`` where the sampled ids begin: text before it was written by the agent
    (a decomposition lead-in), fed to the model as a prompt, not sampled."""
    logprobs: list[float] | None = None
    """Log-probability of each of ``token_ids`` under the sampling distribution (same length),
    or None when the backend did not report them."""

    @property
    def fault(self) -> str | None:
        """The kind of failure of this step's cell (``ExecutionResult.fault``; stored with the
        execution, so old rows without it load as None)."""
        return self.execution.fault if self.execution is not None else None


class Trajectory(BaseModel):
    """A multi-turn tool-integrated solution attempt."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    problem: str
    problem_id: str | None = None
    """Id of the problem in its dataset (e.g. ``gsm8k/test/17``), if it came from one."""
    reference: str | None = None
    """Reference (gold) answer, if known."""
    sample: int | None = None
    """Index of this attempt among the samples drawn for the problem (collection key)."""
    config_hash: str | None = None
    """Hash of the model + agent settings that produced it (collection key, see store.py)."""
    score: float | None = None
    """Reward-model score, when one was computed (``tirforge select --min-score``)."""
    messages: list[dict] = Field(default_factory=list)
    """The chat prompt the model was given (system and user turns), before the assistant's
    steps: with ``steps`` it reproduces the exact model input, which training needs."""
    steps: list[Step] = Field(default_factory=list)
    final_answer: str | None = None
    """Answer extracted from the last step (content of the last \\boxed{})."""
    verdict: str | None = None
    """Grading verdict: correct / incorrect / no_answer / unparseable; None if no reference."""
    stop_reason: StopReason | None = None
    model: str = ""
    format: str = "qwen-tir"
    sampling: dict = Field(default_factory=dict)
    """Sampling settings used (temperature, top_p, max_new_tokens, seed, ...)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent in generation, execution and in total."""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def code_cells(self) -> list[str]:
        return [s.code for s in self.steps if s.code is not None]


def append_jsonl(path: str | Path, trajectories: list[Trajectory] | Trajectory) -> None:
    """Append trajectories to a JSONL file, one complete line per write.

    Each record goes out in a single ``write`` of one line followed by fsync, so a crash leaves at
    most one torn final line, which ``read_jsonl`` reports instead of silently dropping.
    """
    items = [trajectories] if isinstance(trajectories, Trajectory) else trajectories
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for t in items:
            f.write(t.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[Trajectory]:
    """Read every trajectory from a JSONL file; a malformed line raises with its line number."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Trajectory.model_validate_json(line))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a valid trajectory record: {e}") from e
    return out
