"""What every model backend provides: continue a batch of partial chats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "eos", "length"]


@dataclass
class SamplingParams:
    """How to sample one continuation."""

    max_new_tokens: int = 512
    """Upper bound on tokens generated in one turn."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed for sampling; fixed seed + same backend gives the same text."""
    n: int = 1
    """Samples per request: ``generate`` returns ``len(requests) * n`` completions, the samples
    of one request next to each other."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Request:
    """A partial chat to continue: ``messages`` rendered by the chat template, then ``prefix``.

    ``prefix`` is the assistant's text so far (earlier turns, code outputs, feedback); the model
    continues it verbatim, which is how the Qwen2.5-Math TIR format runs multi-turn.
    """

    messages: list[dict]
    prefix: str = ""
    stop: Callable[[str], bool] | None = None
    """Called on the text generated so far; True ends the turn (e.g. a code block closed)."""
    stop_strings: tuple[str, ...] = ()
    """The same stop as plain strings, for engines and servers that take only strings."""
    on_text: Callable[[str], None] | None = None
    """Receives new text as it is generated, for backends that can stream (else unused)."""
    seed: int | None = None
    """This request's sampling seed, overriding ``SamplingParams.seed``, so that requests with
    different seeds can share one batch. Servers and vLLM honour it per request; the
    transformers backend seeds a batch with its first row's seed."""
    pieces: list[tuple[str, list[int] | None]] | None = None
    """``prefix`` as (text, sampled token ids or None) pieces (``trajectories.tokens``): a
    backend that tokenises itself feeds the model's own earlier ids verbatim and tokenises only
    the text between them (token in, token out); None: tokenise ``prefix`` as text."""
    tag: str = ""
    """Which trajectory the request belongs to ("problem id#sample@run", unique within a
    process), for backends that keep per-trajectory state (replay scripts) and for logs."""


@dataclass
class Completion:
    """One continuation of a ``Request``."""

    text: str
    """The generated text (special tokens removed), up to where the turn ended."""
    finish_reason: FinishReason
    n_tokens: int = 0
    """Tokens generated (as the backend or server counts them)."""
    extra: dict = field(default_factory=dict)
    token_ids: list[int] | None = None
    """The generated token ids, in order, under the model's tokenizer; a final EOS token is
    included when the turn ended on it (the model chose to stop). None when the backend or
    server does not report them. Token-faithful training (GRPO) uses these instead of
    re-tokenising ``text``, which need not give the same ids."""
    logprobs: list[float] | None = None
    """Natural-log probability of each sampled token in ``token_ids`` (same length), under the
    distribution it was drawn from: the model's softmax after temperature and top-p (greedy:
    the model's raw softmax). None when not reported."""


class Backend(Protocol):
    """A model that continues partial chats."""

    name: str

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]: ...
