"""`collect|eval --ray` on a real two-node Ray cluster on this machine (no mocks of Ray).

Replay backend + real sandboxed kernels; the actors really run on both nodes, one is really
killed with SIGKILL, the driver really dies. Each test checks the store holds every key exactly
once, with no torn line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray  # the [ray] extra, part of [dev]: a missing Ray fails here, it is never skipped
from ray._private import utils as ray_utils  # the address file path (see the fixture)
from ray.cluster_utils import Cluster

from tirforge.agent.graph import AgentConfig
from tirforge.agent.pipelines.distributed import BackendSpec, RayCollector, RayConfig
from tirforge.executors import ExecutorConfig
from tirforge.trajectories.datasets import FieldMap, data_root, load_file
from tirforge.trajectories.store import Store, key_of

pytestmark = pytest.mark.timeout(600)

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_gsm8k.jsonl"
GSM8K = FieldMap("question", "answer", "gsm8k")
PROBLEMS = load_file(FIXTURE, GSM8K, name="tiny")  # 6 problems
K = 3


def turns(sleep: float) -> list[str]:
    """A cell that really runs in the kernel (and takes ``sleep`` s), then the answer."""
    return [f"```python\nimport time; time.sleep({sleep})\nprint(sum(i**2 for i in range(21)))"
            "\n```", "So \\boxed{2870}."]


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, 1 CPU each, logs under a private temp dir; torn down whole."""
    temp = tempfile.mkdtemp(prefix="tfray-")  # short: Ray's socket paths must fit 107 bytes
    # Ray writes the head's address to <system temp>/ray/ray_current_cluster whatever temp_dir
    # says, and does not create that folder (a fresh machine has none).
    os.makedirs(os.path.dirname(ray_utils.get_ray_address_file(None)), exist_ok=True)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 * 2**20, "include_dashboard": False,
        "temp_dir": temp})
    try:
        c.add_node(num_cpus=1, object_store_memory=150 * 2**20)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout
        shutil.rmtree(temp, ignore_errors=True)
        assert not left.split(), f"Ray processes left running: {left}"


def collector(cluster, sleep: float, **cfg) -> RayCollector:
    return RayCollector(BackendSpec(replay_turns=turns(sleep)),
                        ExecutorConfig(backend="local", sandbox="bwrap"),
                        RayConfig(address=cluster.address, **cfg))


def exactly_once(store_dir: Path, n: int) -> list:
    store = Store(store_dir)
    raw = list(store.iter_raw())
    keys = [key_of(t) for t in raw]
    assert len(keys) == n and len(set(keys)) == n, sorted(keys)
    assert store.torn == []  # only the driver writes, whole lines
    for shard in store.shards():
        assert shard.read_bytes().endswith(b"\n")
    return raw


def test_two_nodes_collect_exactly_once_and_resume(cluster, tmp_path):
    store = Store(tmp_path / "store")
    with collector(cluster, 0.05, concurrency=2) as rc, store:
        rep = rc.collect(PROBLEMS, samples=K, store=store, cfg_hash="h", agent_cfg=AgentConfig(),
                         model_name="replay")
        assert rep.new == 18 and rep.failed == 0 and rep.trajectories == 18
        assert rep.pass_at_1 == pytest.approx(4 / 6)  # problems 0 and 3 have reference 2871
        # One actor per node, both did work.
        assert len(rep.workers) == 2
        assert len({w.node for w in rep.workers}) == 2
        assert all(w.trajectories > 0 and w.per_minute > 0 for w in rep.workers)
        assert sum(w.trajectories for w in rep.workers) == 18
        assert rep.retried == [] and all(w.restarts == 0 for w in rep.workers)
        raw = exactly_once(tmp_path / "store", 18)
        assert all(t.steps[0].output.strip() == "2870" for t in raw)  # a real kernel ran it
        # Seeds are those of a one-machine run: re-runs and resumes draw the same samples.
        from tirforge.agent.pipelines.collect import job_seed

        by_id = {p.id: p for p in PROBLEMS}
        assert all(t.sampling["seed"] == job_seed(by_id[t.problem_id], t.sample) for t in raw)
        again = rc.collect(PROBLEMS, samples=K, store=store, cfg_hash="h",
                           agent_cfg=AgentConfig(), model_name="replay")
        assert again.new == 0 and again.trajectories == 18
    exactly_once(tmp_path / "store", 18)


@pytest.mark.parametrize("restarts", [0, 1], ids=["actor-gone", "actor-restarted"])
def test_kill_9_of_an_actor_mid_run(cluster, tmp_path, restarts):
    """SIGKILL one actor's process while it holds jobs: they run again, nothing twice."""
    store = Store(tmp_path / "store")
    seen = {"n": 0}
    killed: dict = {}
    with collector(cluster, 0.4, concurrency=1, max_restarts=restarts) as rc, store:
        victim = rc.slots[1]

        def on_done(_traj) -> None:
            seen["n"] += 1
            if seen["n"] == 2 and not killed:  # truly mid-run: 16 of 18 jobs still to do
                killed["pid"] = victim.stats.pid
                killed["kernels"] = subprocess.run(  # its sandboxes (bwrap -> ipykernel)
                    ["pgrep", "-P", str(victim.stats.pid)], capture_output=True, text=True
                ).stdout.split()
                threading.Thread(target=os.kill, args=(killed["pid"], signal.SIGKILL)).start()

        rep = rc.collect(PROBLEMS, samples=K, store=store, cfg_hash="h",
                         agent_cfg=AgentConfig(), on_done=on_done)
    assert killed, "the run ended before an actor could be killed"
    assert rep.failed == 0 and rep.trajectories == 18
    assert rep.new == 18 and seen["n"] == 18  # each job delivered once, none lost
    assert len(rep.retried) >= 1 and len(set(rep.retried)) == len(rep.retried)
    dead = rep.workers[1]
    assert dead.retried == len(rep.retried)
    if restarts:
        assert dead.alive and dead.restarts == 1 and dead.pid != killed["pid"]
    else:  # retried on the other actor
        assert not dead.alive and rep.workers[0].trajectories == 18 - dead.trajectories
    exactly_once(tmp_path / "store", 18)
    assert not Path(f"/proc/{killed['pid']}").exists()
    # bwrap --die-with-parent: the dead actor's kernels went with it.
    assert killed["kernels"], "the actor had no kernel process to check"
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{k}").exists() for k in killed["kernels"]):
        assert time.monotonic() < deadline, f"kernels outlived their actor: {killed['kernels']}"
        time.sleep(0.2)


def _count(store_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in store_dir.glob("shard-*.jsonl"))


def test_driver_killed_mid_run_then_rerun_resumes_exactly_once(cluster, tmp_path):
    replay = tmp_path / "turns.json"
    replay.write_text(json.dumps(turns(0.3)))
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "tirforge.apps.cli", "collect", str(FIXTURE),
           "--problem-field", "question", "--answer-field", "answer", "--answer-format", "gsm8k",
           "--samples", str(K), "--out", str(out), "--replay", str(replay), "--sandbox", "bwrap",
           "--ray", "--ray-address", cluster.address, "--concurrency", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while _count(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert 2 <= _count(out) < 18
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flat = " ".join(done.stdout.split())
    assert "collection summary" in flat and "ray actors" in flat
    raw = exactly_once(out, 18)
    assert all(t.final_answer == "2870" for t in raw)
    assert len(Store(out).shards()) == 2  # one per driver run: the actors never write


def test_eval_on_ray_matches_the_protocol(cluster, tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    if not (data_root() / "gsm8k").exists():
        pytest.fail("the shared benchmark data (../shared/data or $TIRFORGE_DATA) is missing")
    replay = tmp_path / "turns.json"
    # GSM8K's first test problem's answer is 18, the next two differ: 1 of 3 right.
    replay.write_text(json.dumps(["```python\nprint(9 * 2)\n```", "So \\boxed{18}."]))
    args = ["eval", "--benchmarks", "gsm8k", "--limit", "3", "--n", "2", "--replay", str(replay),
            "--out", str(tmp_path / "eval"), "--sandbox", "bwrap", "--ray",
            "--ray-address", cluster.address]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]["gsm8k"]
    assert row["greedy"] == pytest.approx(100 / 3)
    assert row["maj@2"] == pytest.approx(100 / 3) and row["pass@2"] == pytest.approx(100 / 3)
    exactly_once(tmp_path / "eval" / "replay" / "gsm8k" / "greedy", 3)
    exactly_once(tmp_path / "eval" / "replay" / "gsm8k" / "sampled", 6)
    assert not ray.is_initialized()  # the command disconnected from the cluster
    bad = CliRunner().invoke(app, [*args, "--search-beam", "2"])
    assert bad.exit_code == 2 and "one machine only" in re.sub(r"[│\s]+", " ", bad.output)


def test_without_ray_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    replay = tmp_path / "turns.json"
    replay.write_text(json.dumps(turns(0)))
    r = CliRunner().invoke(app, [
        "collect", str(FIXTURE), "--problem-field", "question", "--answer-field", "answer",
        "--answer-format", "gsm8k", "--out", str(tmp_path / "store"), "--replay", str(replay),
        "--ray"])
    assert r.exit_code == 2, r.output
    assert "pip install 'tirforge[ray]'" in re.sub(r"[│\s]+", " ", r.output)
    assert Store(tmp_path / "store").holder() is None  # the lock was given back


def test_an_actor_that_cannot_start_is_reported_at_once(cluster, tmp_path):
    spec = BackendSpec(model=str(tmp_path / "no-such-model"), backend="transformers")
    rc = RayCollector(spec, ExecutorConfig(sandbox="bwrap"), RayConfig(address=cluster.address))
    with pytest.raises(RuntimeError, match="could not start") as e:
        rc.start()
    assert "no-such-model" in str(e.value)
    assert not ray.is_initialized() and rc.slots == []


def test_bad_ray_numbers_are_refused_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    for bad in ({"actors": 0}, {"concurrency": -1}, {"chunk": 0}, {"gpus_per_actor": -1.0}):
        with pytest.raises(ValueError):
            RayConfig(**bad)
    replay = tmp_path / "turns.json"
    replay.write_text(json.dumps(turns(0)))
    r = CliRunner().invoke(app, [
        "collect", str(FIXTURE), "--problem-field", "question", "--answer-field", "answer",
        "--answer-format", "gsm8k", "--out", str(tmp_path / "store"), "--replay", str(replay),
        "--ray", "--ray-actors", "0"])
    assert r.exit_code == 2 and "ray actors must be at least 1" in r.output
    assert not ray.is_initialized()
