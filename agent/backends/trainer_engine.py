"""The agent backend over a TRL ``GRPOTrainer``'s own vLLM engine (``use_vllm=True``).

With ``use_vllm`` TRL keeps a vLLM engine whose weights it syncs from the policy before each
generation step; the agent's model calls must go there, not to a second copy of the model, so
that rollouts are sampled from the current policy at vLLM speed and the sampled logprobs are
the ones TRL's importance-sampling correction compares with the trainer's:

- ``vllm_mode="colocate"``: the engine is ``trainer.vllm_generation.llm`` (a ``vllm.LLM`` in the
  training process, one per rank): wrapped by ``VLLMBackend.from_llm``, token in through
  ``Request.pieces``, stopped per token on the closing fence.
- ``vllm_mode="server"``: the engine is a ``vllm serve`` process on other GPUs (TRL pushes the
  weights over NCCL); every rank reaches it over HTTP through ``OpenAIBackend`` with token-id
  prompts on ``/v1/completions`` (the endpoint TRL's own ``VLLMClient`` uses).

Both return the sampled token ids and their log-probabilities. One backend per engine, built
on first use and kept (its HTTP connections and thread pool are reused every step).
"""

from __future__ import annotations

from typing import Any

_ATTR = "_tirforge_backend"
"""Where the backend is kept: on TRL's ``VLLMGeneration``, so it lives as long as the engine."""


def uses_vllm(trainer: Any) -> bool:
    """True when ``trainer`` generates with vLLM (TRL ``use_vllm``)."""
    return bool(getattr(trainer, "use_vllm", False)) and hasattr(trainer, "vllm_generation")


def server_url(generation: Any) -> str:
    """The OpenAI-compatible base URL (``.../v1``) of a server-mode ``VLLMGeneration``, from
    ``vllm_server_base_url`` or ``vllm_server_host``:``vllm_server_port`` (TRL's own rule)."""
    base = generation.server_base_url or (
        f"http://{generation.server_host}:{generation.server_port}")
    return base.rstrip("/") + "/v1"


def trainer_backend(trainer: Any, max_concurrency: int = 64) -> Any:
    """The agent backend over ``trainer``'s vLLM engine (see the module doc), the same object
    on every call for the same engine.

    ``max_concurrency``: requests in flight to a server (server mode). Raises ValueError when
    the trainer does not use vLLM, and NotImplementedError for colocated tensor parallelism
    (each rank of a TP group must issue the same requests to the shared engine, which
    independent agent rollouts per rank do not)."""
    if not uses_vllm(trainer):
        raise ValueError("the trainer does not generate with vLLM (use_vllm=False)")
    gen = trainer.vllm_generation
    backend = getattr(gen, _ATTR, None)
    if backend is not None:
        return backend
    tok = trainer.processing_class
    if gen.mode == "colocate":
        if getattr(gen, "tensor_parallel_size", 1) > 1:
            raise NotImplementedError(
                "agent rollouts on a colocated vLLM engine with vllm_tensor_parallel_size > 1: "
                "use vllm_mode='server' (or tensor_parallel_size=1, one engine per GPU)")
        from tirforge.agent.backends.vllm import VLLMBackend

        name = getattr(getattr(gen, "model", None), "name_or_path", "") or ""
        backend = VLLMBackend.from_llm(gen.llm, model_path=str(name), tokenizer=tok)
    elif gen.mode == "server":
        from tirforge.agent.backends.openai import OpenAIBackend

        backend = OpenAIBackend(server_url(gen), tokenizer=tok, endpoint="completions",
                                max_concurrency=max_concurrency)
    else:
        raise ValueError(f"unknown vllm_mode {gen.mode!r}")
    setattr(gen, _ATTR, backend)
    return backend
