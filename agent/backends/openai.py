"""OpenAI-compatible server backend: ``vllm serve``, ``transformers serve``, SGLang, ...

Multi-turn TIR needs the model to continue the assistant's text *exactly*. The completions
endpoint does that: we render the chat template here (with the model's tokenizer) and send the
prompt as token ids (``trajectories.tokens.prompt_ids``: the earlier turns' sampled ids verbatim
from ``Request.pieces``, the text between them tokenised once), so the server continues from the
very ids the trainer will see (token in, token out; vLLM, SGLang and TRL's server accept a list
of ids as ``prompt``). A server that rejects an id prompt (400 / 422 where the same text prompt
is accepted) gets template + prefix as text from then on, with one logged warning, and the
backend reports ``token_in = False``: its trajectories are not token-faithful (the server
re-tokenised the earlier turns), which ``agent.pipelines.rollout`` records per trajectory for
the trainer. Without a tokenizer, or on a server without completions, the chat endpoint is used
with the prefix as a final assistant message that the server is asked to continue
(``continue_final_message``, honoured by vLLM and SGLang); that is text in as well.

Requests of one batch are sent concurrently (at most ``max_concurrency`` at a time); transient
failures (connection refused, timeouts, 429, 5xx) are retried with exponential backoff.

Each request also asks for the sampled tokens' log-probabilities (``logprobs``, standard) and
token ids (``return_token_ids``, a vLLM extension); a server that rejects these fields (400, 422) is
asked again without them, and from then on never. What a server does not return stays None.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import openai

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.trajectories.tokens import prompt_ids

logger = logging.getLogger(__name__)

Endpoint = Literal["auto", "completions", "chat"]
_REJECTED = (openai.BadRequestError, openai.UnprocessableEntityError)
"""What a server answers to a request field it does not take."""
_TRANSIENT = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
)


class ServerUnavailable(RuntimeError):
    """The server could not be reached (or kept failing) after every retry."""

    batch_wide = True  # the runner does not retry a batch's requests one by one for this


class OpenAIBackend:
    """Continue partial chats on any OpenAI-compatible server."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer: str | Any | None = None,
        endpoint: Endpoint = "auto",
        max_concurrency: int = 16,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 300.0,
        token_info: bool = True,
        token_in: bool = True,
    ):
        """``model``: the served model name (None: the server's first model). ``tokenizer``: a
        local path or id whose chat template matches the served model, or a loaded tokenizer
        (None: try ``model``); needed for the completions endpoint. ``token_info``: ask for
        token ids and log-probabilities (False: never). ``token_in``: send completions prompts
        as token ids (False: as text, e.g. for a server that re-tokenises anyway)."""
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout_s
        )
        self.base_url, self.endpoint = base_url, endpoint
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.token_info = token_info
        self._ids_prompt = token_in
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_concurrency, thread_name_prefix="openai")
        self.model = model or self._retry(lambda: self.client.models.list().data[0].id)
        self.template = None
        if endpoint != "chat":
            self.template = (self._load_template(tokenizer or self.model)
                             if tokenizer is None or isinstance(tokenizer, str) else tokenizer)
        if endpoint == "completions" and self.template is None:
            raise ValueError(
                f"the completions endpoint needs the chat template: pass tokenizer= (a local "
                f"path or hub id of {self.model!r}'s tokenizer)"
            )

    @property
    def token_in(self) -> bool:
        """True while prompts go to the server as token ids (earlier turns' sampled ids
        verbatim); False on the chat endpoint or after a server rejected an id prompt."""
        return self.template is not None and self._ids_prompt

    @staticmethod
    def _load_template(name: str) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            return None
        return tok if tok.chat_template else None

    # -- plumbing ---------------------------------------------------------------------------
    def _retry(self, call):
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except _TRANSIENT as e:
                if attempt == self.max_retries:
                    raise ServerUnavailable(
                        f"OpenAI-compatible server at {self.base_url} failed "
                        f"{self.max_retries + 1} times ({type(e).__name__}: {e}); is it running?"
                    ) from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _sampling(self, params: SamplingParams, stop: tuple[str, ...]) -> dict:
        kw: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            kw["seed"] = params.seed
        if stop:
            kw["stop"] = list(stop)
        return kw

    def _finish(self, req: Request, text: str, reason: str | None, n_tokens: int,
                ids: list[int] | None = None, lps: list[float] | None = None) -> Completion:
        if req.stop is not None and req.stop(text):
            why = "stop"
        else:
            why = "length" if reason == "length" else "eos"
        return Completion(text=text, finish_reason=why, n_tokens=n_tokens,
                          extra={"endpoint": self.endpoint_used},
                          token_ids=ids or None, logprobs=lps or None)

    def _with_info(self, call, chat: bool):
        """``call`` asking for token ids and log-probabilities; a server that rejects the
        fields (400, 422) is asked again without them, and never again."""
        if not self.token_info:
            return call
        info: dict[str, Any] = {"logprobs": True, "top_logprobs": 0} if chat else {"logprobs": 0}

        def asking(**more):
            extra = {**(more.pop("extra_body", None) or {}), "return_token_ids": True}
            try:
                return call(**info, extra_body=extra, **more)
            except _REJECTED:
                # Only when the plain request goes through were the fields the cause (a prompt
                # over the context length is rejected either way, and raises here).
                out = call(**more)
                self.token_info = False  # other threads may already be asking again
                return out

        return asking


    # -- endpoints --------------------------------------------------------------------------
    @property
    def endpoint_used(self) -> str:
        return "completions" if self.template is not None else "chat"

    def _one(self, req: Request, params: SamplingParams) -> Completion:
        kw = self._sampling(params, req.stop_strings)
        if self.template is not None:
            try:
                return self._complete(req, kw)
            except openai.NotFoundError:
                if self.endpoint == "completions":
                    raise
                self.template = None  # "auto" on a chat-only server: use chat from now on
        return self._chat(req, kw)

    def _complete(self, req: Request, kw: dict) -> Completion:
        head = self.template.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False
        )
        text = head + req.prefix

        def create(prompt: Any, more: dict):
            return self.client.completions.create(model=self.model, prompt=prompt, **kw, **more)

        def plain(**more):
            if not self._ids_prompt:
                return create(text, more)
            # Token in: the earlier turns' sampled ids verbatim, not a re-tokenisation of text.
            ids = prompt_ids(req.messages, req.pieces, req.prefix, self.template)
            try:
                return create(ids, more)
            except _REJECTED as e:
                out = create(text, more)  # raises as well when the ids were not the cause
                self._text_prompts(e)
                return out

        call = self._with_info(plain, chat=False)
        if req.on_text is not None:
            return self._streamed(req, call, lambda c: c.text, chat=False)
        r = self._retry(call)
        choice = r.choices[0]
        n = r.usage.completion_tokens if r.usage else 0
        done = self._finish(req, choice.text, choice.finish_reason, n,
                            *_token_info(choice, chat=False))
        echo = getattr(choice, "prompt_token_ids", None)  # vLLM, with return_token_ids
        if echo is not None:
            done.extra["prompt_token_ids"] = list(echo)
        return done

    def _text_prompts(self, why: Exception) -> None:
        """The server takes text prompts only: send text from now on, and say so once."""
        with self._lock:  # concurrent requests all find out: one warning
            first, self._ids_prompt = self._ids_prompt, False
        if first:
            logger.warning(
                "%s rejected a token-id prompt (%s): sending text prompts from now on; the "
                "server re-tokenises earlier turns, so trajectories are not token-faithful "
                "(marked sampling['token_in'] = False)", self.base_url, why)

    def _streamed(self, req: Request, call, text_of, chat: bool) -> Completion:
        """Server-sent chunks go to ``req.on_text`` as they arrive (token events). Only
        opening the stream is retried: a stream that breaks midway has already shown text."""
        assert req.on_text is not None
        stream = self._retry(lambda: call(stream=True))
        parts: list[str] = []
        ids: list[int] = []
        lps: list[float] = []
        reason, n = None, 0
        for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                more_ids, more_lps = _token_info(choice, chat)
                ids += more_ids
                lps += more_lps
                text = text_of(choice) or ""
                if text:
                    parts.append(text)
                    n += 1  # one token per chunk unless the server reports usage
                    req.on_text(text)
                reason = choice.finish_reason or reason
            if getattr(chunk, "usage", None):
                n = chunk.usage.completion_tokens
        return self._finish(req, "".join(parts), reason, n, ids, lps)

    def _chat(self, req: Request, kw: dict) -> Completion:
        messages, extra = list(req.messages), None
        if req.prefix:
            messages.append({"role": "assistant", "content": req.prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        def plain(**more):
            body = {**(extra or {}), **(more.pop("extra_body", None) or {})}
            return self.client.chat.completions.create(
                model=self.model, messages=messages, extra_body=body or None, **kw, **more)

        call = self._with_info(plain, chat=True)
        if req.on_text is not None:
            return self._streamed(req, call, lambda c: c.delta.content, chat=True)
        r = self._retry(call)
        choice = r.choices[0]
        n = r.usage.completion_tokens if r.usage else 0
        return self._finish(req, choice.message.content or "", choice.finish_reason, n,
                            *_token_info(choice, chat=True))

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        # Samples are separate calls (not every server implements ``n``), each with its seed.
        def sampling(r: Request, i: int) -> SamplingParams:
            seed = r.seed if r.seed is not None else params.seed
            if params.n == 1 and i == 0 and seed == params.seed:
                return params
            return SamplingParams(**{**params.as_dict(), "n": 1,
                                     "seed": None if seed is None else seed + i})

        jobs = [(r, sampling(r, i)) for r in requests for i in range(params.n)]
        return list(self._threads.map(lambda job: self._one(*job), jobs))

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        self.client.close()


def _token_info(choice: Any, chat: bool) -> tuple[list[int], list[float]]:
    """(token ids, sampled-token log-probabilities) of one choice or stream chunk; empty lists
    where the server returned none."""
    ids = list(getattr(choice, "token_ids", None) or [])
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return ids, []
    if chat:
        return ids, [float(t.logprob) for t in (lp.content or [])]
    return ids, [float(x) for x in (lp.token_logprobs or []) if x is not None]
