"""Fit a long trajectory into ``max_length`` tokens so that its end survives.

The rule (``keep_end``), for a sequence of ``n > L`` tokens whose first ``p`` tokens are the
prompt (system + problem, up to where the model starts writing):

* keep the head: the first ``h = min(p, L // 2)`` tokens: the whole prompt when it fits in half
  the budget, else its first half-budget (the problem statement starts there);
* then ``MARKER`` (a short text, never trained on) saying that tokens were cut;
* then the tail: the last ``L - h - len(marker)`` tokens, so the final answer and the steps
  just before it are always kept.

Why: an outcome reward model and a preference pair are about the *end* of a trajectory: its
final ``\\boxed{}`` is what is graded. Cutting from the right drops exactly that, and two
trajectories that differ only in their last box become the same token sequence with opposite
labels. Keeping the head and the tail is the "head + tail" truncation of Sun et al. (2019), "How
to Fine-Tune BERT for Text Classification?" (§5.3.1: head + tail beat head-only and tail-only on
long documents); here the head is the prompt, because the problem is what the end answers.
Sequences that still collide after truncation carry no preference and are dropped by callers.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
MARKER = "\n[... truncated ...]\n"
"""Text put where the middle was cut (tokenised with the model's tokenizer; never a label)."""


@dataclass
class Fitted:
    """A sequence cut to fit ``max_length``."""

    input_ids: list[int]
    labels: list[int]
    """-100 where not trained on (the marker included)."""
    prompt_length: int
    """Tokens of ``input_ids`` that belong to the prompt (the kept head of it)."""
    cut: int
    """Tokens removed (0: the sequence fitted as it was)."""


def marker_ids(tokenizer) -> list[int]:
    """Token ids of ``MARKER`` for ``tokenizer``."""
    return tokenizer(MARKER, add_special_tokens=False)["input_ids"]


def keep_end(
    ids: list[int], labels: list[int], prompt_length: int, max_length: int | None,
    marker: list[int],
) -> Fitted:
    """Cut ``ids``/``labels`` (same length) to at most ``max_length`` tokens by the module's rule.

    ``prompt_length``: tokens of the prompt at the start of ``ids``. ``marker``: the marker's ids
    (left out when it would take more than a quarter of the budget). ``max_length=None``: no cut.
    Raises ``ValueError`` for ``max_length < 2`` or mismatched lengths."""
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    n = len(ids)
    if max_length is None or n <= max_length:
        return Fitted(list(ids), list(labels), min(prompt_length, n), 0)
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: too short to keep a head and a tail")
    if len(marker) * 4 > max_length:
        marker = []
    head = min(prompt_length, max_length // 2)
    tail = max_length - head - len(marker)
    return Fitted(
        input_ids=ids[:head] + marker + ids[n - tail:],
        labels=labels[:head] + [IGNORE_INDEX] * len(marker) + labels[n - tail:],
        prompt_length=head,
        cut=n - head - tail,
    )
