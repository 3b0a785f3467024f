"""The token stream of a trajectory: the model's sampled ids verbatim, the text between them
tokenised once.

Decoding sampled ids and encoding the text again need not give the same ids (a fence sampled as
three "`" tokens re-encodes as one "```" token; a chat template re-applied to the decoded text
moves whitespace), and training on the re-encoded ids computes the loss on tokens the policy
never sampled. So a trajectory is kept, and fed back to the model between turns, as a stream:

    ids = encode(chat template head) + [turn 0 ids] + encode(env text 0) + [turn 1 ids] + ...

where each turn's ids are ``Step.token_ids`` (exactly what the backend sampled) and each env text
(```output block, feedback) is tokenised on its own. The backend (``Request.pieces``) and the
trainer (``training.grpo.rollout_example``) build it with the same function, so the prompt of
turn k+1 begins with the prompt of turn k followed by the ids sampled in turn k (the *prefix
property*, checked by ``prefix_violations``).

A turn without ids (a backend that does not report them, a decomposition plan) falls back to
tokenising its text: it is marked in ``TokenStream.retokenised``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.transcript import render_output


def prefix_pieces(steps: Iterable[Step]) -> list[tuple[str, list[int] | None, bool]]:
    """The assistant transcript of ``steps`` (``transcript.render_prefix`` order) as
    (text, sampled ids or None, written by the model) pieces."""
    out: list[tuple[str, list[int] | None, bool]] = []
    for s in steps:
        if s.sampled_from:  # agent-written lead-in (decomposition prompt): fed, not sampled
            out.append((s.text[: s.sampled_from], None, False))
        out.append((s.text[s.sampled_from :], s.token_ids, True))
        if s.output is not None:
            out.append((render_output(s.output), None, False))
        if s.feedback:
            out.append((s.feedback, None, False))
    return out


def request_pieces(steps: Iterable[Step]) -> list[tuple[str, list[int] | None]]:
    """``prefix_pieces`` as ``Request.pieces`` (text, ids)."""
    return [(text, ids) for text, ids, _ in prefix_pieces(steps)]


def encode(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with no special tokens added (the template already wrote them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def head_text(messages: list[dict], tokenizer, chat_template: str | None = None) -> str:
    """The chat template over ``messages`` with the generation prompt: what the model
    continues."""
    kw = {} if chat_template is None else {"chat_template": chat_template}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **kw)


def turn_ids(tokenizer, text: str, ids: list[int]) -> list[int]:
    """``ids`` cut after the token that completes ``text`` (a turn cut at its closing fence keeps
    the token that closed it, drops what was sampled past it). A final token that decodes to
    nothing (EOS) is kept; ids that do not decode to ``text`` are kept whole."""
    def covers(n: int) -> bool:
        return tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(text)

    n = len(ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if len(full) <= len(text) or not full.startswith(text):
        return list(ids)
    while n > 0 and covers(n - 1):
        n -= 1
    return list(ids[:n])


@dataclass
class TokenStream:
    """A trajectory as the ids the model saw and sampled."""

    ids: list[int]
    sampled: list[int]
    """1 where the model sampled the token (this turn's ids), 0 for template / env text."""
    logprobs: list[float | None]
    """Sampled log-probability per token (None: env text, or not reported)."""
    n_prompt: int
    """Tokens of the chat template head (the prompt before any assistant token)."""
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) of each model turn's ids in ``ids``."""
    retokenised: list[int] = field(default_factory=list)
    """Indices of the steps whose ids were not recorded and were tokenised from their text."""


def token_stream(messages: list[dict], steps: list[Step], tokenizer,
                 chat_template: str | None = None) -> TokenStream:
    """The ``TokenStream`` of a chat prompt and its steps (see the module docstring)."""
    ids = encode(tokenizer, head_text(messages, tokenizer, chat_template))
    n_prompt = len(ids)
    sampled, lps = [0] * n_prompt, [None] * n_prompt
    spans, retok = [], []
    step_i = -1
    for text, sids, by_model in prefix_pieces(steps):
        if by_model:
            step_i += 1
            if sids is None:
                retok.append(step_i)
                piece, plp = encode(tokenizer, text), None
            else:
                piece = turn_ids(tokenizer, text, sids)
                raw = steps[step_i].logprobs
                plp = raw[: len(piece)] if raw is not None and len(raw) >= len(piece) else None
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
            sampled += [1] * len(piece)
            lps += plp if plp is not None else [None] * len(piece)
        else:
            piece = encode(tokenizer, text)
            ids += piece
            sampled += [0] * len(piece)
            lps += [None] * len(piece)
    return TokenStream(ids, sampled, lps, n_prompt, spans, retok)


def prompt_ids(messages: list[dict], pieces: list[tuple[str, list[int] | None]] | None,
               prefix: str, tokenizer, chat_template: str | None = None) -> list[int]:
    """The ids a backend feeds the model for a request: the token stream of ``pieces`` (token
    in), or, without pieces, the template head + ``prefix`` tokenised as one text."""
    head = head_text(messages, tokenizer, chat_template)
    if pieces is None:
        return encode(tokenizer, head + prefix)
    ids = encode(tokenizer, head)
    for text, sids in pieces:
        ids += encode(tokenizer, text) if sids is None else turn_ids(tokenizer, text, sids)
    return ids


def turn_prompts(traj: Trajectory, tokenizer, chat_template: str | None = None,
                 token_in: bool = True) -> list[list[int]]:
    """For each model turn k of ``traj``, the prompt ids the model was fed before it: the token
    stream of steps[:k] (``token_in``), or the re-tokenised text (a text-only backend)."""
    out = []
    for k, step in enumerate(traj.steps):
        done = request_pieces(traj.steps[:k])
        if step.sampled_from:  # the turn's request ended with its agent-written lead-in
            done.append((step.text[: step.sampled_from], None))
        pieces = done if token_in else None
        prefix = "".join(t for t, _ in done)
        out.append(prompt_ids(traj.messages, pieces, prefix, tokenizer, chat_template))
    return out


def prefix_violations(traj: Trajectory, tokenizer, chat_template: str | None = None,
                      token_in: bool = True) -> list[int]:
    """The turns k whose successor's prompt does NOT begin with turn k's prompt followed by
    every id sampled in turn k (empty: the prefix property holds). Turns without recorded ids
    are checked against their re-tokenised text."""
    prompts = turn_prompts(traj, tokenizer, chat_template, token_in)
    bad = []
    for k in range(len(traj.steps) - 1):
        s = traj.steps[k]
        text = s.text[s.sampled_from :]
        mine = (turn_ids(tokenizer, text, s.token_ids) if s.token_ids is not None
                else encode(tokenizer, text))
        want = prompts[k] + mine
        if prompts[k + 1][: len(want)] != want:
            bad.append(k)
    return bad


def assert_prefix_property(traj: Trajectory, tokenizer, chat_template: str | None = None) -> None:
    """Raise ValueError naming the turns where the prefix property fails (token-in prompts)."""
    bad = prefix_violations(traj, tokenizer, chat_template)
    if bad:
        raise ValueError(f"trajectory {traj.id}: the prompt of turn k+1 does not extend turn k's "
                         f"prompt + sampled ids at k = {bad}")
