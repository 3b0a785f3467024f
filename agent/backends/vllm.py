"""vLLM backend: the in-process ``vllm.LLM`` engine on GPUs.

Multi-turn TIR re-submits the whole prompt (chat template + assistant text so far) each turn;
with prefix caching on, vLLM reuses the KV cache of the shared prefix, so a turn costs only its
new tokens. vLLM is imported lazily: it is an optional extra (``pip install 'tirforge[gpu]'``)
that needs CUDA.
"""

from __future__ import annotations

from typing import Any

from tirforge.agent.backends.base import Completion, Request, SamplingParams

INSTALL_HINT = (
    "the vllm backend needs vLLM and a CUDA GPU: pip install 'tirforge[gpu]' "
    "(or use --backend openai against a `vllm serve` server)"
)


def import_vllm() -> Any:
    """Import vllm, or raise ImportError with how to get it."""
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken CUDA install raising at import time
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return vllm


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
        **engine_kwargs: Any,
    ):
        """``max_model_len``: context length (None: the model's own, e.g. 4096 for
        Qwen2.5-Math); ``engine_kwargs`` go to ``vllm.LLM`` (tensor_parallel_size, ...)."""
        vllm = import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path, dtype=dtype, enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = model_path

    def close(self) -> None:
        """Stop the engine core process and its workers (frees the GPU for training)."""
        self.llm.llm_engine.engine_core.shutdown()

    def render(self, req: Request) -> str:
        head = self.tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False
        )
        return head + req.prefix

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        # One SamplingParams per request: stop strings differ between turn kinds.
        sps = [
            self._vllm.SamplingParams(
                n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_p=params.top_p, seed=params.seed if r.seed is None else r.seed,
                stop=list(r.stop_strings) or None,
                skip_special_tokens=True,
            )
            for r in requests
        ]
        # Token ids, not text: the chat template already holds the special tokens.
        prompts = [
            {"prompt_token_ids": self.tokenizer.encode(self.render(r), add_special_tokens=False)}
            for r in requests
        ]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        completions = []
        for req, out in zip(requests, outs, strict=True):
            for o in out.outputs:
                if req.stop is not None and req.stop(o.text):
                    reason = "stop"
                else:
                    reason = "length" if o.finish_reason == "length" else "eos"
                if req.on_text is not None and o.text:
                    req.on_text(o.text)
                completions.append(
                    Completion(text=o.text, finish_reason=reason, n_tokens=len(o.token_ids))
                )
        return completions
