"""transformers backend: batched generation on CPU or GPU, stopping as soon as a turn ends."""

from __future__ import annotations

import copy
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging as hf_logging

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.trajectories.tokens import prompt_ids


class _StopWhen(StoppingCriteria):
    """Per-row stop check on the decoded continuation (e.g. "a ```python block has closed"),
    which also streams new text to ``Request.on_text``.

    Decoding a few hundred tokens costs little next to a forward pass; rows without a stop
    condition or a listener are never decoded.
    """

    def __init__(self, tokenizer, prompt_len: int, requests: list[Request]):
        self.tok, self.prompt_len, self.requests = tokenizer, prompt_len, requests
        self.sent = [0] * len(requests)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, req in enumerate(self.requests):
            if req.stop is None and req.on_text is None:
                continue
            text = self.tok.decode(input_ids[i, self.prompt_len :], skip_special_tokens=True)
            if req.on_text is not None and len(text) > self.sent[i]:
                req.on_text(text[self.sent[i] :])
                self.sent[i] = len(text)
            if req.stop is not None:
                done[i] = req.stop(text)
        return done


class _SampledLogprobs(LogitsProcessor):
    """Records each sampled token's log-probability under the distribution it was drawn from.

    ``generate`` applies its sampling warpers (temperature, top-p) after custom processors,
    so this one applies the same two itself to what it records (greedy: the raw softmax),
    leaving ``scores`` untouched. At step t it sees the token sampled at step t-1 and gathers
    its log-probability from the previous step's distribution: one (batch, vocab) tensor is
    kept, never the whole ``output_scores`` history.
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0) -> None:
        self.warpers = LogitsProcessorList()
        if temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # each (batch,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        warped = self.warpers(input_ids, scores.float())
        self.prev = torch.log_softmax(warped, dim=-1)
        return scores

    def table(self, out: torch.Tensor, prompt_len: int) -> list[list[float]]:
        """Per row, the log-probabilities of ``out[:, prompt_len:]`` (padding rows included)."""
        steps = list(self.steps)
        if self.prev is not None and out.shape[1] - prompt_len > len(steps):
            last = out[:, prompt_len + len(steps)].unsqueeze(1)
            steps.append(self.prev.gather(1, last).squeeze(1))
        if not steps:
            return [[] for _ in range(out.shape[0])]
        return torch.stack(steps, dim=1).tolist()


class TransformersBackend:
    """Continue partial chats with a local transformers causal LM."""

    name = "transformers"

    def __init__(self, model_path: str = "", *, device: str | None = None, dtype: str = "auto",
                 model=None, tokenizer=None):
        """Load ``model_path`` (a local folder or hub id) onto ``device`` (default: cuda when
        available) in ``dtype`` (``auto``: bf16 on a GPU, fp32 on a CPU); or, given ``model``
        and ``tokenizer``, generate with that model as it is, already in memory (e.g. the policy
        a trainer is updating: it is neither moved, cast, copied nor put in eval mode; the
        tokenizer is copied to pad on the left)."""
        t0 = time.perf_counter()
        if model is not None:
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer")
            self.model, self.model_path = model, model_path or "policy"
            self.device = str(next(model.parameters()).device)
            self.tokenizer = copy.copy(tokenizer)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.load_s = 0.0
            return
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            # bf16 matmuls are slow on most CPUs; fp32 for a 135M model costs only ~0.5 GB.
            torch_dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # A local safetensors load takes ~1 s; its per-tensor progress bar is only noise.
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        finally:
            hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        self.model_path = model_path
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "policy") -> TransformersBackend:
        """A backend around an already-loaded model and tokenizer (see ``__init__``)."""
        return cls(name, model=model, tokenizer=tokenizer)

    def render(self, req: Request) -> str:
        """Chat template + generation prompt + the assistant's text so far."""
        head = self.tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False
        )
        return head + req.prefix

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        if params.n > 1:  # samples of one request sit next to each other
            requests = [r for r in requests for _ in range(params.n)]
        # Token in: each row's ids are its earlier turns' sampled ids verbatim (Request.pieces),
        # never a re-tokenisation of their decoded text; left-padded into one batch.
        rows = [prompt_ids(r.messages, r.pieces, r.prefix, self.tokenizer) for r in requests]
        prompt_len = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        enc = {
            "input_ids": torch.tensor([[pad] * (prompt_len - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor(
                [[0] * (prompt_len - len(r)) + [1] * len(r) for r in rows]),
        }
        enc = {k: v.to(self.device) for k, v in enc.items()}
        # One generator for the whole batch: the first row's seed stands for all of them.
        seed = next((r.seed for r in requests if r.seed is not None), params.seed)
        if seed is not None:
            torch.manual_seed(seed)
        sample = params.temperature > 0
        recorder = _SampledLogprobs(params.temperature, params.top_p)
        out = self.model.generate(
            **enc,
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            stopping_criteria=[_StopWhen(self.tokenizer, prompt_len, requests)],
            logits_processor=LogitsProcessorList([recorder]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        logprobs = recorder.table(out, prompt_len)
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        eos_ids.add(self.tokenizer.eos_token_id)
        cut = eos_ids | {self.tokenizer.pad_token_id}  # a finished row is padded
        completions = []
        for i, req in enumerate(requests):
            new = out[i, prompt_len:].tolist()
            # Trim padding after an early-finished row; remember whether it ended on EOS.
            n, hit_eos = len(new), False
            for j, t in enumerate(new):
                if t in cut:
                    n, hit_eos = j, t in eos_ids
                    break
            text = self.tokenizer.decode(new[:n], skip_special_tokens=True)
            if req.stop is not None and req.stop(text):
                reason = "stop"
            elif hit_eos:
                reason = "eos"
            else:
                reason = "length"
            # The EOS the model chose belongs to its ids; padding after a stopped row does not.
            kept = n + 1 if reason == "eos" else n
            completions.append(Completion(
                text=text, finish_reason=reason, n_tokens=n,
                token_ids=new[:kept], logprobs=logprobs[i][:kept],
            ))
        return completions
