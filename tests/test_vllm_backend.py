"""vLLM backend: the transformers backend's checks where vLLM + CUDA exist; elsewhere the lazy
import must fail with a message that says how to get it (this test never skips)."""

import importlib.util

import pytest

from tirforge.agent.backends.base import Request, SamplingParams

try:
    import torch

    HAVE_GPU = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
except Exception:  # pragma: no cover
    HAVE_GPU = False

PROMPTS = ["What is 2+2?", "Compute the sum of the first 100 primes, please.", "x"]


def reqs(prefix: str = "Let me") -> list[Request]:
    return [Request(messages=[{"role": "user", "content": p}], prefix=prefix) for p in PROMPTS]


@pytest.mark.skipif(HAVE_GPU, reason="vLLM is usable here: the GPU test below runs instead")
def test_lazy_import_error_is_clear(monkeypatch):
    import sys

    from tirforge.agent.backends import vllm as vb

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
    with pytest.raises(ImportError, match=r"pip install 'tirforge\[gpu\]'.*vllm serve"):
        vb.VLLMBackend("any-model")


@pytest.mark.skipif(not HAVE_GPU, reason="needs vLLM and a CUDA GPU; the import test runs instead")
def test_vllm_matches_transformers_greedy(tmp_path):
    from tests.test_hf_backend import make_tiny_model
    from tirforge.agent.backends.hf import TransformersBackend
    from tirforge.agent.backends.vllm import VLLMBackend

    path = make_tiny_model(tmp_path / "tiny")
    engine = VLLMBackend(path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=2048)
    params = SamplingParams(max_new_tokens=12)
    batched = engine.generate(reqs(), params)
    single = [engine.generate([r], params)[0] for r in reqs()]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.n_tokens == 12 and c.finish_reason == "length" for c in batched)
    hf = TransformersBackend(path, device="cuda", dtype="float32").generate(reqs(), params)
    # Different kernels: allow the first divergence late, but the start must agree.
    assert [c.text[:8] for c in batched] == [c.text[:8] for c in hf]
    sampled = engine.generate(reqs()[:1], SamplingParams(max_new_tokens=8, temperature=1.0,
                                                         seed=3, n=2))
    assert len(sampled) == 2
