"""The append-only store: keys, torn tails, bad records, concurrent writers, one writer lock."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, StoreConfig, StoreLocked, config_hash, key_of


def traj(pid="p/0", k=0, h="h", answer="1"):
    return Trajectory(problem="q", problem_id=pid, sample=k, config_hash=h, final_answer=answer)


def test_roundtrip_and_done_keys(tmp_path):
    with Store(tmp_path) as s:
        for k in range(3):
            s.add(traj(k=k))
    s2 = Store(tmp_path)
    assert s2.done_keys() == {("p/0", 0, "h"), ("p/0", 1, "h"), ("p/0", 2, "h")}
    assert [t.sample for t in s2.read()] == [0, 1, 2]


def test_unkeyed_record_is_refused(tmp_path):
    with Store(tmp_path) as s, pytest.raises(ValueError, match="store key"):
        s.add(Trajectory(problem="q"))


def test_torn_tail_is_skipped_and_reported(tmp_path):
    with Store(tmp_path) as s:
        s.add(traj(k=0))
        s.add(traj(k=1))
    shard = Store(tmp_path).shards()[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])  # what kill -9 in mid-write leaves
    s = Store(tmp_path)
    assert [t.sample for t in s.read()] == [0]
    assert s.torn == [f"{shard}:2"]
    assert s.done_keys() == {("p/0", 0, "h")}
    # A new writer never appends to the torn shard: it opens its own.
    with s:
        s.add(traj(k=1))
    assert sorted(t.sample for t in Store(tmp_path).read()) == [0, 1]
    assert len(Store(tmp_path).shards()) == 2


def test_malformed_complete_line_raises_with_location(tmp_path):
    with Store(tmp_path) as s:
        s.add(traj())
    shard = Store(tmp_path).shards()[0]
    with shard.open("a") as f:
        f.write('{"problem": 3}\n')
    with pytest.raises(ValueError, match=rf"{shard.name}:2"):
        Store(tmp_path).read()
    with pytest.raises(ValueError, match=rf"{shard.name}:2"):
        Store(tmp_path).done_keys()


def test_duplicate_keys_read_once_first_wins(tmp_path):
    with Store(tmp_path) as s:
        s.add(traj(answer="first"))
    with Store(tmp_path) as s:  # e.g. two collectors racing on the same job
        s.add(traj(answer="second"))
    s = Store(tmp_path)
    assert len(list(s.iter_raw())) == 2
    assert [t.final_answer for t in s.read()] == ["first"]


def test_threads_write_whole_lines(tmp_path):
    s = Store(tmp_path, StoreConfig(fsync=False, shard_max_records=50))
    big = "x" * 20_000  # lines far above PIPE_BUF must still never interleave

    def writer(w):
        for k in range(40):
            s.add(traj(pid=f"p/{w}", k=k, answer=big))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    out = Store(tmp_path).read()
    assert len(out) == 160 and len({key_of(t) for t in out}) == 160
    assert len(Store(tmp_path).shards()) == 4  # rolled over every 50 records


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


# -- one writer at a time ----------------------------------------------------------------------

HOLD = """
import subprocess, sys, time
from tirforge.trajectories.store import Store
s = Store(sys.argv[1]).acquire()
# A child that outlives us (like a kernel of a killed collect) must not keep the lock.
child = subprocess.Popen(["sleep", "60"], close_fds=False, start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_second_writer_in_this_process_fails_naming_the_holder(tmp_path):
    first = Store(tmp_path)
    first.add(traj(k=0))
    second = Store(tmp_path)
    with pytest.raises(StoreLocked) as e:
        second.add(traj(k=1))
    assert e.value.holder["pid"] == os.getpid()
    assert e.value.holder["host"] == socket.gethostname()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e.value.holder["since"])
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(e.value)
    assert second.holder()["pid"] == os.getpid()
    assert [t.sample for t in second.read()] == [0]  # reading never needs the lock
    first.close()
    assert second.holder() is None
    second.add(traj(k=1))
    second.close()
    assert sorted(t.sample for t in Store(tmp_path).read()) == [0, 1]


def test_lock_of_another_process_is_named_and_freed_by_kill_9(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    sleeper = None
    try:
        sleeper = int(proc.stdout.readline())
        s = Store(tmp_path)
        with pytest.raises(StoreLocked, match=f"pid {proc.pid} on "):
            s.acquire()
        assert s.holder()["pid"] == proc.pid
        proc.kill()
        proc.wait(timeout=10)
        # The holder died (its child `sleep` lives on with the descriptor table it was given):
        # the kernel dropped the lock, so the next run writes at once.
        s.acquire()
        s.add(traj())
        s.close()
        assert Store(tmp_path).done_keys() == {("p/0", 0, "h")}
        assert _alive(sleeper)  # the child really held an inherited table
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if sleeper is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sleeper, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stores_of_older_versions_read_each_key_once(tmp_path):
    """Older versions let two writers store one key twice: every reader keeps the first."""
    for answer in ("first", "second", "third"):
        rec = traj(k=0, answer=answer).model_dump_json() + "\n"
        other = traj(k=1, answer=answer).model_dump_json() + "\n"
        (tmp_path / f"shard-{time.time_ns():020d}-1-abcdef.jsonl").write_text(rec + other)
    s = Store(tmp_path)
    assert len(list(s.iter_raw())) == 6
    assert [(t.sample, t.final_answer) for t in s.read()] == [(0, "first"), (1, "first")]
    assert s.done_keys() == {("p/0", 0, "h"), ("p/0", 1, "h")}


# -- the same command twice on one store (real CLI, kernels, replay backend) -------------------

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_gsm8k.jsonl"
def slow(seconds: float) -> list[str]:
    """Replayed turns whose cell sleeps: a collect that is still writing when others meet it."""
    return [f"```python\nimport time; time.sleep({seconds})\nprint(2870)\n```", "\\boxed{2870}"]


SLOW = slow(0.5)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _collect_cmd(tmp_path: Path, turns_: list[str] = SLOW) -> list[str]:
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(turns_))
    return [sys.executable, "-m", "tirforge.apps.cli", "collect", str(FIXTURE),
            "--problem-field", "question", "--answer-field", "answer", "--answer-format", "gsm8k",
            "--samples", "2", "--out", str(tmp_path / "store"), "--replay", str(turns),
            "--concurrency", "2", "--sandbox", "bwrap", "--no-fsync"]


def _exactly_once(store_dir: Path, n: int) -> None:
    raw = list(Store(store_dir).iter_raw())
    keys = [key_of(t) for t in raw]
    assert len(keys) == n and len(set(keys)) == n, sorted(keys)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_two_collects_started_together_store_each_key_once(tmp_path):
    cmd = _collect_cmd(tmp_path)
    procs = [subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 2], outs
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    assert f"being written by pid {procs[winner].pid} on {socket.gethostname()}" in " ".join(
        outs[loser].split())
    assert "collection summary" in outs[winner]
    _exactly_once(tmp_path / "store", 12)


def test_orphan_of_an_earlier_run_blocks_a_rerun_until_it_ends(tmp_path):
    # 2 s cells: the orphan must outlive the re-run's CLI start on a loaded machine.
    cmd = _collect_cmd(tmp_path, slow(2))
    # The orphan: started by a shell that exits at once (as when a terminal or a parent dies).
    shell = subprocess.run(["sh", "-c", 'setsid "$@" >/dev/null 2>&1 & echo $!', "sh", *cmd],
                           env=ENV, capture_output=True, text=True, timeout=30)
    orphan = int(shell.stdout)
    try:
        deadline = time.monotonic() + 120
        while not any((tmp_path / "store").glob("shard-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(orphan), "the orphan ended before the re-run could meet it"
        rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 2, rerun.stdout[-2000:]
        assert f"being written by pid {orphan} on " in " ".join(rerun.stdout.split())
        while _running(orphan) and time.monotonic() < deadline + 180:
            time.sleep(0.1)
        assert not _running(orphan)
        again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert re.search(r"new this run\s*│\s*0\s", again.stdout), again.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(orphan, signal.SIGKILL)
    _exactly_once(tmp_path / "store", 12)
