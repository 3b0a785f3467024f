"""The append-only store: keys, torn tails, bad records, concurrent writers."""

import threading

import pytest

from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, StoreConfig, config_hash, key_of


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
