"""The openai backend against a real ``transformers serve`` on a tiny local model (offline)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_hf_backend import PROMPTS, make_tiny_model
from tirforge.agent.backends.base import Request, SamplingParams
from tirforge.agent.backends.hf import TransformersBackend
from tirforge.agent.backends.openai import OpenAIBackend, ServerUnavailable
from tirforge.agent.graph import AgentConfig, solve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--dtype", "float32"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(20)


def reqs(prefix: str = "Let me") -> list[Request]:
    return [Request(messages=[{"role": "user", "content": p}], prefix=prefix) for p in PROMPTS]


def test_completions_continue_the_prefix_exactly(server, model_path):
    remote = OpenAIBackend(server, model=model_path, tokenizer=model_path, max_concurrency=3)
    assert remote.endpoint_used == "completions"
    local = TransformersBackend(model_path, device="cpu")
    params = SamplingParams(max_new_tokens=12)
    got = remote.generate(reqs(), params)
    want = local.generate(reqs(), params)
    assert [c.text for c in got] == [c.text for c in want]  # same model, greedy: same tokens
    assert [c.n_tokens for c in got] == [c.n_tokens for c in want]
    assert all(c.finish_reason == "length" for c in got)


def test_graph_runs_on_the_server(server, model_path):
    remote = OpenAIBackend(server, model=model_path, tokenizer=model_path)
    cfg = AgentConfig(format="qwen-cot", sampling=SamplingParams(max_new_tokens=8))
    traj = solve("What is 2+2?", remote, None, cfg, reference="4")
    assert traj.format == "qwen-cot" and len(traj.steps) == 2  # turn, then the \boxed{ nudge
    assert traj.steps[0].feedback.endswith("\\boxed{")
    assert traj.model == "openai"


def test_chat_endpoint_without_tokenizer(server, model_path):
    remote = OpenAIBackend(server, model=model_path, endpoint="chat")
    assert remote.endpoint_used == "chat"
    out = remote.generate(reqs("")[:2], SamplingParams(max_new_tokens=6))
    assert len(out) == 2 and all(c.n_tokens > 0 and c.text for c in out)


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match="failed 3 times.*is it running"):
        OpenAIBackend(url, model="m", endpoint="chat", max_retries=2, backoff_s=0.1).generate(
            reqs()[:1], SamplingParams(max_new_tokens=4))
    assert time.monotonic() - t0 >= 0.3  # backed off 0.1 + 0.2 s between tries


def test_completions_need_a_template():
    with pytest.raises(ValueError, match="tokenizer="):
        OpenAIBackend("http://127.0.0.1:9/v1", model="/nonexistent", endpoint="completions")


def test_cli_solve_on_the_server(server, model_path, tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app
    from tirforge.trajectories.schema import read_jsonl

    out = tmp_path / "t.jsonl"
    res = CliRunner().invoke(app, [
        "solve", "What is 2+2?", "--answer", "4", "--format", "qwen-cot", "--backend", "openai",
        "--base-url", server, "--model", model_path, "--max-new-tokens", "8", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    assert "final answer" in res.output
    (traj,) = read_jsonl(out)
    assert traj.format == "qwen-cot" and traj.verdict is not None


def test_cli_server_down_exits_cleanly():
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    res = CliRunner().invoke(app, [
        "solve", "1+1?", "--backend", "openai", "--base-url",
        f"http://127.0.0.1:{free_port()}/v1", "--model", "",
    ])
    assert res.exit_code == 2
    assert "is it running" in " ".join(res.output.split())  # rich wraps long lines


def test_streaming_gives_the_same_text_in_chunks(server, model_path):
    """With ``on_text`` the backend streams (server-sent events): the chunks arrive one by one
    and join to exactly the text the non-streaming call returns, on both endpoints."""
    # transformers serve has no continue_final_message: the chat case starts a fresh turn.
    for endpoint, tok, prefix in (("completions", model_path, "Let me"), ("chat", None, "")):
        remote = OpenAIBackend(server, model=model_path, tokenizer=tok, endpoint=endpoint)
        params = SamplingParams(max_new_tokens=10)
        plain = remote.generate(reqs(prefix)[:1], params)[0]
        chunks: list[str] = []
        req = reqs(prefix)[0]
        req.on_text = chunks.append
        streamed = remote.generate([req], params)[0]
        assert len(chunks) > 1, endpoint  # really streamed, not one chunk at the end
        assert "".join(chunks) == streamed.text == plain.text, endpoint
        assert streamed.finish_reason == plain.finish_reason


def test_text_only_server_falls_back_once_and_rollouts_are_marked(server, model_path, caplog):
    """``transformers serve`` rejects a token-id prompt (400): the backend sends text from then
    on with one warning for the whole concurrent batch, and the GRPO rollouts it produced are
    marked not token-faithful, so their logprobs do not reach the trainer."""
    from tirforge.agent.pipelines.rollout import agent_rollout, prompt_key
    from tirforge.executors import ExecutorConfig
    from tirforge.executors.pool import KernelPool
    from tirforge.training import rollout_batch

    remote = OpenAIBackend(server, model=model_path, tokenizer=model_path, max_concurrency=3)
    local = TransformersBackend(model_path, device="cpu")
    assert remote.token_in
    params = SamplingParams(max_new_tokens=6)
    with caplog.at_level("WARNING", logger="tirforge.agent.backends.openai"):
        got = remote.generate(reqs(), params)
    assert not remote.token_in
    assert sum("rejected a token-id prompt" in r.message for r in caplog.records) == 1
    assert [c.text for c in got] == [c.text for c in local.generate(reqs(), params)]

    cfg = AgentConfig(format="qwen-cot", sampling=SamplingParams(max_new_tokens=6))
    prompt = cfg.fmt.build_messages("What is 2+2?", hint=cfg.tool_hint)
    with KernelPool(ExecutorConfig(backend="local", sandbox="auto"), size=1) as pool:
        rollout = agent_rollout(cfg, pool, {prompt_key(prompt): {"problem": "What is 2+2?",
                                                                 "reference": "4"}},
                                backend_factory=lambda model, tok: remote)
        trajs = rollout([prompt, prompt], None, local.tokenizer)
    assert [t.sampling["token_in"] for t in trajs] == [False, False]
    for t in trajs:  # sampled ids stand in for logprobs a text-only server does not give
        for s in t.steps:
            s.logprobs = [-1.0] * len(s.token_ids or [0])
            s.token_ids = s.token_ids or local.tokenizer(s.text)["input_ids"]
    out, stats = rollout_batch.rollout_batch(trajs, local.tokenizer, 256)
    assert stats["tir/text_prompt_rollouts"] == 2
    assert out["logprobs"] is None  # none passed on (with token in they would be)
