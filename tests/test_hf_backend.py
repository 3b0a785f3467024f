"""transformers backend on a tiny random Llama with the real SmolLM2 tokenizer."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tirforge.agent.backends.base import Request, SamplingParams
from tirforge.agent.backends.hf import TransformersBackend
from tirforge.agent.graph import AgentConfig, solve
from tirforge.agent.models import resolve_model
from tirforge.agent.runner import RunnerConfig, run_many

PROMPTS = ["What is 2+2?", "Compute the sum of the first 100 primes, please.", "x"]


def make_tiny_model(path) -> str:
    """Save a 2-layer random Llama + the default model's tokenizer to ``path``."""
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return TransformersBackend(make_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")


def reqs(prefix: str = "") -> list[Request]:
    return [Request(messages=[{"role": "user", "content": p}], prefix=prefix) for p in PROMPTS]


def test_batched_greedy_equals_one_by_one(backend):
    params = SamplingParams(max_new_tokens=24)
    batched = backend.generate(reqs("Let me"), params)
    single = [backend.generate([r], params)[0] for r in reqs("Let me")]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.n_tokens for c in batched] == [c.n_tokens for c in single]
    assert all(c.n_tokens > 0 for c in batched)


def test_stop_ends_one_row_and_streams(backend):
    params = SamplingParams(max_new_tokens=20)
    free = backend.generate(reqs(), params)
    chunks: list[str] = []
    r = reqs()
    cut = free[1].text[:8]
    r[1].stop = lambda t: t.startswith(cut) and len(t) >= len(cut)
    r[1].on_text = chunks.append
    out = backend.generate(r, params)
    assert out[1].finish_reason == "stop" and out[1].text.startswith(cut)
    assert out[1].n_tokens < free[1].n_tokens
    assert "".join(chunks) == out[1].text
    assert out[0].text == free[0].text and out[2].text == free[2].text  # other rows unaffected


def test_sampling_seed_and_n(backend):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, n=2)
    a = backend.generate(reqs()[:1], params)
    b = backend.generate(reqs()[:1], params)
    assert len(a) == 2 and [c.text for c in a] == [c.text for c in b]
    assert a[0].text != a[1].text  # two samples differ


def test_runner_batches_give_the_same_trajectories(backend):
    # A random model writes no code and no answer: generate -> nudge -> finish for each.
    cfg = AgentConfig(format="qwen-cot", sampling=SamplingParams(max_new_tokens=16))
    one_by_one = [solve(p, backend, None, cfg) for p in PROMPTS]
    batched = run_many(PROMPTS, backend, None, cfg, RunnerConfig(max_batch=8))
    # Same texts and sampled ids; log-probabilities agree up to batched (padded) float error.
    assert [t.steps for t in batched] == [
        [s.model_copy(update={"gen_s": b.gen_s, "logprobs": b.logprobs})
         for s, b in zip(t.steps, bt.steps, strict=True)]
        for t, bt in zip(one_by_one, batched, strict=True)
    ]
    for t, bt in zip(one_by_one, batched, strict=True):
        for s, b in zip(t.steps, bt.steps, strict=True):
            assert s.token_ids and len(s.logprobs) == len(s.token_ids)
            assert b.logprobs == pytest.approx(s.logprobs, abs=1e-3)
    assert all(len(t.steps) == 2 for t in batched)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_token_ids_and_logprobs_match_a_forward_pass(backend, temperature):
    """The recorded ids are the generated tokens and each log-probability is the one the
    token was drawn with: a teacher-forced forward pass over prompt + ids gives the same
    values (log-softmax of logits / temperature; top_p=1 keeps every token)."""
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=3)
    outs = backend.generate(reqs("Let me"), params)
    tok = backend.tokenizer
    for req, c in zip(reqs("Let me"), outs, strict=True):
        assert c.token_ids is not None and len(c.logprobs) == len(c.token_ids) > 0
        assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
        prompt = tok(backend.render(req), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.inference_mode():
            logits = backend.model(ids).logits[0, len(prompt) - 1 : -1].float()
        if temperature > 0:
            logits = logits / temperature
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])
        assert torch.allclose(torch.tensor(c.logprobs), want[:, 0], atol=1e-3), c.text
