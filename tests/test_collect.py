"""Collection end to end: replay backend, real sandboxed kernels, real store, real kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.graph import AgentConfig
from tirforge.agent.pipelines.collect import run_collect, summarize
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.trajectories.datasets import FieldMap, load_file
from tirforge.trajectories.store import Store, key_of

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_gsm8k.jsonl"
GSM8K = FieldMap("question", "answer", "gsm8k")
CODE = "Let me compute.\n```python\nx = sum(i**2 for i in range(1, 21))\nprint(x)\n```"


def test_collect_on_replay_backend(tmp_path):
    problems = load_file(FIXTURE, GSM8K, name="tiny")
    store = Store(tmp_path / "store")
    backend = ReplayBackend([CODE, "\\boxed{2870}"])  # every trajectory plays its own copy
    cfg = ExecutorConfig(backend="local", sandbox="bwrap", pool_size=2)
    with KernelPool(cfg) as pool:
        args = dict(samples=2, store=store, cfg_hash="h1", backend=backend, pool=pool,
                    agent_cfg=AgentConfig(), concurrency=2)
        rep = run_collect(problems, **args)
        assert rep.new == 12 and rep.failed == 0 and rep.trajectories == 12
        # Problems 0 and 3 have reference 2871: 4 of 6 problems solved, every sample alike.
        assert rep.pass_at_1 == pytest.approx(4 / 6)
        assert rep.pass_at_k == pytest.approx(4 / 6)
        assert rep.maj_at_k == pytest.approx(4 / 6)
        assert rep.mean_turns == 2
        trajs = store.read()
        assert all(t.steps[0].output.strip() == "2870" for t in trajs)  # a real kernel ran it
        assert {key_of(t) for t in trajs} == {(p.id, k, "h1") for p in problems for k in (0, 1)}
        # Model calls of concurrent trajectories went out together (the runner batches).
        assert max(backend.batch_sizes) == 2 and sum(backend.batch_sizes) == 24
        # Each (problem, sample) has its own seed, the same on every run.
        seeds = {(t.problem_id, t.sample): t.sampling["seed"] for t in trajs}
        assert len(set(seeds.values())) == 12
        # Re-run: nothing left to do.
        calls = len(backend.calls)
        again = run_collect(problems, **args)
        assert again.new == 0 and again.trajectories == 12 and len(backend.calls) == calls


class Flaky(ReplayBackend):
    """Fails the first request of one trajectory, like a server that went away once."""

    def __init__(self, turns, bad_tag):
        super().__init__(turns)
        self.bad_tag, self.failed = bad_tag, False

    def generate(self, requests, params):
        if not self.failed and any(r.tag.startswith(self.bad_tag + "@") for r in requests):
            self.failed = True
            raise RuntimeError("model server went away")
        return super().generate(requests, params)


def test_failed_jobs_are_counted_and_retried(tmp_path):
    problems = load_file(FIXTURE, GSM8K, name="tiny", limit=2)
    store = Store(tmp_path / "store")
    backend = Flaky(["\\boxed{2870}"], bad_tag="tiny/1#0")
    with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap", pool_size=1)) as pool:
        args = dict(samples=1, store=store, cfg_hash="h", backend=backend, pool=pool,
                    agent_cfg=AgentConfig())
        rep = run_collect(problems, **args)
        assert rep.failed == 1 and "model server went away" in rep.errors[0]
        assert rep.new == 1 and rep.error_rate == pytest.approx(0.5)
        rep = run_collect(problems, **args)
        assert rep.new == 1 and rep.failed == 0 and rep.trajectories == 2


def test_summarize_majority_vote(tmp_path):
    problems = load_file(FIXTURE, GSM8K, name="tiny", limit=2)  # refs 2871, 2870
    from tirforge.trajectories.schema import Trajectory

    def t(pid, ans, verdict):
        return Trajectory(problem="p", problem_id=pid, final_answer=ans, verdict=verdict)

    trajs = [t("tiny/0", "2871", "correct"), t("tiny/0", "1", "incorrect"),
             t("tiny/0", "1", "incorrect"), t("tiny/1", "2870", "correct"),
             t("tiny/1", "2870.0", "correct"), t("tiny/1", None, "no_answer")]
    rep = summarize(trajs, problems)
    assert rep.pass_at_1 == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert rep.pass_at_k == 1.0
    assert rep.maj_at_k == 0.5  # problem 0's majority is the wrong "1"


def _count(store_dir: Path) -> int:
    return sum(
        p.read_bytes().count(b"\n") for p in store_dir.glob("shard-*.jsonl")
    ) if store_dir.exists() else 0


def test_kill_9_then_resume_is_exactly_once(tmp_path):
    """Kill the whole collection (process group, kernels included) mid-run, several times."""
    turns = tmp_path / "turns.json"
    slow = CODE.replace("print(x)", "import time; time.sleep(0.2)\nprint(x)")
    turns.write_text(json.dumps([slow, "So the answer is \\boxed{2870}."]))
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "tirforge.apps.cli", "collect", str(FIXTURE),
           "--problem-field", "question", "--answer-field", "answer", "--answer-format", "gsm8k",
           "--samples", "3", "--out", str(out), "--replay", str(turns), "--concurrency", "2",
           "--sandbox", "bwrap", "--no-fsync"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kills = 0
    for _ in range(3):
        before = _count(out)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        # Kill as soon as this run has written something new, i.e. truly mid-run.
        while _count(out) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
    assert kills >= 2, "the collection finished before it could be killed"
    assert 0 < _count(out) < 18
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "collection summary" in done.stdout and "pass@3" in done.stdout
    store = Store(out)
    raw = list(store.iter_raw())
    keys = [key_of(t) for t in raw]
    assert len(keys) == 18 and len(set(keys)) == 18  # no duplicate lines, none missing
    assert {(pid, k) for pid, k, _ in keys} == {(f"tiny_gsm8k/{i}", k) for i in range(6)
                                               for k in range(3)}
    assert len(store.shards()) >= 3  # each run wrote its own shard
    assert all(t.final_answer == "2870" for t in raw)
