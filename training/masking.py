"""Tokenise a trajectory for training, with labels only on model-written tokens.

The rule: a token gets a label iff every character it covers was written by the model — the
text of each step and the end-of-turn token that closes an assistant turn the model ended.
Everything else is -100: the system / user prompt, chat-template scaffolding, every executor
output (```output blocks in the ``fenced`` layout, ``tool`` messages in the ``tool`` layout) and
the agent's reflect / nudge feedback.

How, exactly:
1. Render the chat once with content placeholders, so each message's content is located in the
   template's text without searching for it (a search could hit an earlier copy); the real
   rendering is checked against the spliced one, so a template that edits content fails loudly.
2. Mark every character trainable or not.
3. Tokenise with offset mappings. With ``split_at_boundaries`` (default) the text is cut where
   trainability changes and each piece is tokenised on its own, so no token straddles model and
   executor text (e.g. a closing fence "```" merging with the "\\n" that starts an output block):
   the model's tokens end where its generation ended, as at inference. Without it the whole text
   is tokenised once and a straddling token is masked (no executor text can leak into labels).
4. Truncate to ``max_length``: ``tokenize_*`` from the right (SFT); ``fit_trajectory`` keeps the
   prompt head and the end (``training.truncation``: reward models and preference pairs, whose
   label is about the final answer).

GRPO does not re-tokenise what the policy sampled: its rows are token streams of the sampled ids
(``trajectories.tokens``, ``training.rollout_batch``); this module is its fallback for
trajectories recorded without ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tirforge.training.truncation import IGNORE_INDEX, Fitted, keep_end, marker_ids
from tirforge.trajectories.messages import SegmentedMessage, Style, to_segments
from tirforge.trajectories.schema import Trajectory

__all__ = [
    "IGNORE_INDEX", "Rendered", "fit_trajectory", "render", "split_prompt", "tokenize_rendered",
    "tokenize_trajectory",
]
_PLACEHOLDER = "\u27e6tirforge-msg-{}\u27e7"


@dataclass
class Rendered:
    """A rendered chat and the character spans the model wrote."""

    text: str
    spans: list[tuple[int, int]]
    """Sorted, non-overlapping [start, end) trainable character spans."""
    prompt_end: int
    """Character offset where the first assistant content starts (end of the prompt)."""


def _special_tokens(tokenizer) -> list[str]:
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    toks |= {t.content for t in added if t.special}
    return sorted(toks, key=len, reverse=True)


def render(
    messages: list[SegmentedMessage],
    tokenizer,
    chat_template: str | None = None,
    train_end_of_turn: bool = True,
) -> Rendered:
    """Render segmented messages with the chat template and find the trainable spans."""
    kw: dict[str, Any] = {"tokenize": False}
    if chat_template is not None:
        kw["chat_template"] = chat_template
    ph = [{"role": m.role, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(ph, **kw)
    specials = _special_tokens(tokenizer)
    text, spans, pos = "", [], 0
    prompt_end = None
    for i, m in enumerate(messages):
        marker = _PLACEHOLDER.format(i)
        at = skeleton.find(marker, pos)
        if at < 0 or skeleton.count(marker) != 1:
            raise ValueError(
                f"the chat template does not render message {i} ({m.role}) content verbatim "
                "exactly once; it cannot be masked by offsets"
            )
        text += skeleton[pos:at]
        pos = at + len(marker)
        if m.role == "assistant" and prompt_end is None:
            prompt_end = len(text)
        for seg in m.segments:
            if seg.trainable and seg.text:
                spans.append((len(text), len(text) + len(seg.text)))
            text += seg.text
        # The end-of-turn token right after the content: trained only if the model ended the turn.
        last = next((s for s in reversed(m.segments) if s.text), None)
        if train_end_of_turn and m.role == "assistant" and last is not None and last.trainable:
            tail = skeleton[pos:]
            eot = next((t for t in specials if tail.startswith(t)), None)
            if eot is not None:
                spans.append((len(text), len(text) + len(eot)))
    text += skeleton[pos:]
    real = tokenizer.apply_chat_template([m.to_dict() for m in messages], **kw)
    if real != text:
        raise ValueError("the chat template changes message content (e.g. strips it); refusing")
    return Rendered(text, _merge(spans), len(text) if prompt_end is None else prompt_end)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def _char_mask(n: int, spans: list[tuple[int, int]]) -> list[bool]:
    mask = [False] * n
    for s, e in spans:
        mask[s:e] = [True] * (e - s)
    return mask


def _tokenize(tokenizer, text: str, start: int) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [(a + start, b + start) for a, b in enc["offset_mapping"]]


def encode_rendered(
    rendered: Rendered, tokenizer, split_at_boundaries: bool = True
) -> tuple[list[int], list[int], int]:
    """(token ids, labels, prompt tokens) of a whole rendered chat, uncut. The prompt tokens are
    those that end at or before ``rendered.prompt_end``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("masking needs a fast tokenizer (offset mappings)")
    text, cmask = rendered.text, _char_mask(len(rendered.text), rendered.spans)
    cuts = [0] + [i for i in range(1, len(text)) if cmask[i] != cmask[i - 1]] + [len(text)]
    if not split_at_boundaries:
        cuts = [0, len(text)]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a < b:
            i, o = _tokenize(tokenizer, text[a:b], a)
            ids += i
            offsets += o
    labels = [
        tid if e > s and all(cmask[s:e]) else IGNORE_INDEX
        for tid, (s, e) in zip(ids, offsets, strict=True)
    ]
    n_prompt = sum(1 for _, e in offsets if e <= rendered.prompt_end)
    return ids, labels, n_prompt


def tokenize_rendered(
    rendered: Rendered,
    tokenizer,
    max_length: int | None = None,
    split_at_boundaries: bool = True,
) -> dict[str, list[int]]:
    """Token ids, attention mask and labels (-100 where not model-written) of a rendered chat,
    cut from the right to ``max_length``."""
    ids, labels, _ = encode_rendered(rendered, tokenizer, split_at_boundaries)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_trajectory(
    traj: Trajectory,
    tokenizer,
    style: Style = "fenced",
    max_length: int | None = None,
    chat_template: str | None = None,
    train_end_of_turn: bool = True,
    split_at_boundaries: bool = True,
) -> dict[str, list[int]]:
    """Tokenise ``traj`` with its chat template; labels are -100 except on model-written tokens."""
    rendered = render(to_segments(traj, style), tokenizer, chat_template, train_end_of_turn)
    return tokenize_rendered(rendered, tokenizer, max_length, split_at_boundaries)


def fit_trajectory(
    traj: Trajectory,
    tokenizer,
    style: Style = "fenced",
    max_length: int | None = None,
    split_at_boundaries: bool = True,
    chat_template: str | None = None,
) -> Fitted:
    """Tokenise ``traj`` like ``tokenize_trajectory`` but fit it into ``max_length`` by keeping the
    prompt head and the end (``training.truncation.keep_end``); ``Fitted.cut`` says how many
    tokens were removed."""
    rendered = render(to_segments(traj, style), tokenizer, chat_template)
    ids, labels, n_prompt = encode_rendered(rendered, tokenizer, split_at_boundaries)
    return keep_end(ids, labels, n_prompt, max_length, marker_ids(tokenizer))


def split_prompt(example: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
    """Split a tokenised example at its first label: (prompt ids, completion ids + labels)."""
    first = next((i for i, lab in enumerate(example["labels"]) if lab != IGNORE_INDEX), None)
    if first is None:
        raise ValueError("example has no trainable token")
    ids, labels = example["input_ids"], example["labels"]
    return ids[:first], {"input_ids": ids[first:], "labels": labels[first:]}
