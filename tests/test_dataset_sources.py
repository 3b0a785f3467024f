"""Where a named benchmark comes from: TIRFORGE_DATA, ../shared/data, the cache, then the Hub.

The Hub is played by local folders laid out like Hub dataset repositories (parquet files per
config and split, configs declared in the README's YAML), which ``datasets.load_dataset`` reads
by path exactly as it reads ``openai/gsm8k``: only the id string differs from a user's run.
"""

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

from tirforge.apps.cli import app
from tirforge.trajectories import datasets as D
from tirforge.trajectories import hub
from tirforge.trajectories.datasets import DatasetNotFoundError, load_dataset

from .data_files import FIXTURES


@pytest.fixture
def clone(monkeypatch, tmp_path):
    """A clone with no data: TIRFORGE_DATA empty, no ../shared/data, an empty cache."""
    (tmp_path / "data").mkdir()  # set and empty: a missing folder is an error of its own
    monkeypatch.setenv("TIRFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(D, "shared_data", lambda: tmp_path / "shared" / "data")
    monkeypatch.setenv("TIRFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _fixture_rows(name: str) -> list[dict]:
    path = FIXTURES / D.DATASETS[name].path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hub_repo(folder, src: hub.HubSource, rows: list[dict]):
    """A Hub-style dataset repo holding ``rows`` spread in order over every (config, split) (a
    part left empty gets the first row again); returns the rows as the repo holds them."""
    import datasets

    parts = [(c or "default", s) for c in src.configs for s in src.splits]
    per = -(-len(rows) // len(parts))
    yaml, held = ["---", "configs:"], []
    for i, (cfg, split) in enumerate(parts):
        chunk = rows[i * per:(i + 1) * per] or rows[:1]
        held += chunk
        datasets.Dataset.from_list(chunk).to_parquet(str(folder / cfg / f"{split}-0.parquet"))
        if split == src.splits[0]:
            yaml += [f"- config_name: {cfg}", "  data_files:"]
        yaml += [f"  - split: {split}", f"    path: {cfg}/{split}-*.parquet"]
    (folder / "README.md").write_text("\n".join([*yaml, "---", ""]))
    return held


def test_no_local_copy_offline_is_one_clear_error(clone):
    for allow in (False, True):  # conftest sets HF_HUB_OFFLINE=1: the flag alone is not enough
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset("gsm8k", allow_network=allow)
        msg = str(e.value)
        assert "TIRFORGE_DATA" in msg and "--allow-network" in msg and "HF_HUB_OFFLINE" in msg
        assert str(clone / "data" / "gsm8k" / "test.jsonl") in msg
        assert str(clone / "shared" / "data" / "gsm8k" / "test.jsonl") in msg
        assert str(clone / "cache" / "datasets" / "gsm8k" / "test.jsonl") in msg
        assert "openai/gsm8k (config main, split test)" in msg
    # A set with no Hub copy says so, and where to get it.
    with pytest.raises(DatasetNotFoundError, match="no faithful copy on the Hugging Face Hub.*"
                       "Qwen2.5-Math.*evaluation/data/college_math/test.jsonl"):
        load_dataset("college_math", allow_network=True)
    assert isinstance(DatasetNotFoundError("x"), FileNotFoundError)


@pytest.mark.parametrize("command", ["collect", "eval", "evolve"])
def test_cli_prints_the_error_without_a_traceback(clone, command):
    args = {
        "collect": ["collect", "gsm8k", "--out", str(clone / "o"), "--replay", "x.json"],
        "eval": ["eval", "--benchmarks", "gsm8k", "--out", str(clone / "o"), "--replay", "x"],
        "evolve": ["evolve", "gsm8k", "--out", str(clone / "o.jsonl")],
    }[command]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())  # rich wraps long lines
    assert "gsm8k: no local copy" in out and "--allow-network" in out and "TIRFORGE_DATA" in out
    assert "Traceback" not in r.output


@pytest.mark.parametrize("name", sorted(["gsm8k", "math", "math500", "aime24", "amc23", "aqua",
                                         "svamp"]))
def test_hub_download_then_offline_from_the_cache(clone, monkeypatch, name):
    src, repo = hub.hub_source(name), clone / "repo"
    held = _hub_repo(repo, src, _fixture_rows(name))
    # The Hub field map must read what the local file's map reads from the same rows.
    local = clone / "local.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in held))
    expected = [(p.problem, p.reference) for p in D.load_file(local, D.DATASETS[name].fields)]
    monkeypatch.setitem(hub.HUB_SOURCES, name, dataclasses.replace(src, repo=str(repo)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user who passed --allow-network
    got = load_dataset(name, allow_network=True)
    assert [(p.problem, p.reference) for p in got] == expected
    assert [p.id for p in got] == [f"{name}/{i}" for i in range(len(held))]
    # Cached under the project's cache root: offline, with the "Hub" gone, it still loads.
    cached = hub.HUB_SOURCES[name].cache_file()
    assert cached.is_relative_to(clone / "cache" / "datasets" / "hub") and cached.exists()
    shutil.rmtree(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_dataset(name, limit=2)
    assert [(p.problem, p.reference) for p in again] == expected[:2]


def test_hub_failure_names_the_source(clone, monkeypatch):
    src = hub.hub_source("gsm8k")
    monkeypatch.setitem(hub.HUB_SOURCES, "gsm8k",
                        dataclasses.replace(src, repo=str(clone / "no-such-repo")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(DatasetNotFoundError, match="no-such-repo.*failed"):
        load_dataset("gsm8k", allow_network=True)
    assert not hub.HUB_SOURCES["gsm8k"].cache_file().exists()  # no half-written copy left


def test_resolution_order(clone, monkeypatch):
    rows = _fixture_rows("gsm8k")
    refs = [p.reference for p in D.load_file(FIXTURES / "gsm8k" / "test.jsonl",
                                             D.DATASETS["gsm8k"].fields)]
    assert len(set(refs[:3])) == 3

    def put(root, picked):
        f = root / "gsm8k" / "test.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in picked))

    put(clone / "cache" / "datasets", rows[2:3])
    assert load_dataset("gsm8k")[0].reference == refs[2]  # the cache copy
    put(clone / "shared" / "data", rows[1:2])
    assert load_dataset("gsm8k")[0].reference == refs[1]  # ../shared/data beats the cache
    put(clone / "data", rows[:1])
    assert load_dataset("gsm8k")[0].reference == refs[0]  # TIRFORGE_DATA wins
    monkeypatch.delenv("TIRFORGE_DATA")
    assert D.resolve("gsm8k")[0] == clone / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_collect_gsm8k_from_the_hub_with_allow_network(clone, monkeypatch):
    """`tirforge collect gsm8k --allow-network` on a clone without data: the rows come from the
    (local stand-in of the) Hub, are cached, and the collection runs on them."""
    src = hub.hub_source("gsm8k")
    _hub_repo(clone / "repo", src, _fixture_rows("gsm8k"))
    stand_in = dataclasses.replace(src, repo=str(clone / "repo"))
    monkeypatch.setitem(hub.HUB_SOURCES, "gsm8k", stand_in)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    turns = clone / "turns.json"
    turns.write_text(json.dumps(["So \\boxed{18}."]))
    args = ["collect", "gsm8k", "--limit", "2", "--samples", "1", "--out", str(clone / "store"),
            "--replay", str(turns), "--concurrency", "1", "--sandbox", "bwrap", "--allow-network"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert hub.HUB_SOURCES["gsm8k"].cache_file().exists()
    rows = [json.loads(line) for p in (clone / "store").glob("shard-*.jsonl")
            for line in p.read_text().splitlines()]
    # Janet's ducks (18) is right, the second problem (3 bolts) is not.
    assert sorted((t["problem_id"], t["verdict"]) for t in rows) == [
        ("gsm8k/0", "correct"), ("gsm8k/1", "incorrect")]
