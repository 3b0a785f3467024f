"""Model backends behind one interface: transformers (default), vllm, openai-compatible servers;
``trainer_engine.trainer_backend`` wraps a TRL GRPOTrainer's own vLLM engine (``use_vllm``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from tirforge.agent.backends.base import Backend

BackendKind = Literal["transformers", "vllm", "openai", "replay"]
BACKENDS: tuple[str, ...] = ("transformers", "vllm", "openai")


def make_backend(
    kind: str,
    model: str = "smollm2",
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    tokenizer: str | None = None,
    allow_network: bool = False,
    max_concurrency: int = 16,
    log: Callable[[str], None] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> Backend:
    """A backend by name. ``model`` is an alias / local folder / hub id for the in-process
    backends and the served model name for ``openai`` (None-like "" asks the server).
    ``engine_kwargs`` go to the vLLM engine (``max_model_len``, ``tensor_parallel_size``,
    ``gpu_memory_utilization``, ...)."""
    if kind == "openai":
        from tirforge.agent.backends.openai import OpenAIBackend

        if not base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(
            base_url, model or None, api_key=os.environ.get(api_key_env),
            tokenizer=tokenizer, max_concurrency=max_concurrency,
        )
    if kind not in ("transformers", "vllm"):
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    from tirforge.agent.models import resolve_model

    path = resolve_model(model, allow_network=allow_network, log=log or print)
    if kind == "vllm":
        from tirforge.agent.backends.vllm import VLLMBackend

        return VLLMBackend(path, **(engine_kwargs or {}))
    from tirforge.agent.backends.hf import TransformersBackend

    return TransformersBackend(path)
