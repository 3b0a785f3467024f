"""Walking-skeleton figures: model load (GGUF vs the bf16 safetensors cache), generation speed,
kernel cell latency, and one `solve` of the sample problem.

    .venv/bin/python bench/bench_solve.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tirforge.agent.backends.base import SamplingParams  # noqa: E402
from tirforge.agent.backends.hf import TransformersBackend  # noqa: E402
from tirforge.agent.graph import AgentConfig, solve  # noqa: E402
from tirforge.agent.models import _smollm2_source, resolve_model  # noqa: E402
from tirforge.executors import LocalKernelExecutor  # noqa: E402

PROBLEM = "What is the sum of the squares of the first 20 positive integers?"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    path = resolve_model("smollm2")
    src, gguf = _smollm2_source()
    _, t_gguf = timed(lambda: AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf))
    _, t_cache = timed(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    print(f"model load  GGUF (dequantise): {t_gguf:6.2f}s")
    print(f"model load  bf16 cache       : {t_cache:6.2f}s   ({t_gguf / t_cache:.1f}x faster)")

    backend = TransformersBackend(path)
    k = LocalKernelExecutor()
    _, t_start = timed(k.start)
    with k:
        lat = [timed(lambda: k.run("1+1"))[1] for _ in range(50)]
        print(f"kernel start (sandboxed, numpy+sympy preloaded): {t_start:.2f}s")
        print(f"kernel cell round trip  median {statistics.median(lat) * 1e3:.1f} ms")
        traj, t_solve = timed(
            lambda: solve(PROBLEM, backend, k, AgentConfig(max_turns=4), reference="2870")
        )
    n_tok = sum(len(backend.tokenizer(s.text)["input_ids"]) for s in traj.steps)
    gen = traj.timings["generate_s"]
    print(
        f"solve: {t_solve:.1f}s  turns={len(traj.steps)} cells={len(traj.code_cells)} "
        f"answer={traj.final_answer} verdict={traj.verdict}  "
        f"generation {n_tok} tokens in {gen:.1f}s = {n_tok / gen:.1f} tok/s"
    )
    sp = SamplingParams(max_new_tokens=64)
    from tirforge.agent.backends.base import Request

    req = Request([{"role": "user", "content": "Count from 1 to 100."}])
    for dtype in ("float32", "bfloat16"):
        b = TransformersBackend(path, dtype=dtype)
        b.generate([req], SamplingParams(max_new_tokens=4))
        for batch in (1, 8):
            cs, t = timed(lambda b=b, batch=batch: b.generate([req] * batch, sp))
            n = sum(c.n_tokens for c in cs)
            print(f"decode {dtype:9s} batch {batch}: {n / t:5.1f} tok/s")


if __name__ == "__main__":
    main()
