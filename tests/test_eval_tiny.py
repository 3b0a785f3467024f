"""`tirforge eval` end to end with a real (tiny, random) model: the transformers backend, the
real SmolLM2 tokenizer and chat template, real kernels, GSM8K's first 5 test problems."""

import json

import pytest
from typer.testing import CliRunner

from tirforge.apps.cli import app

from .data_files import FIXTURES
from .training_utils import tiny_model_dir

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _gsm8k_fixture(monkeypatch):
    """GSM8K's first test rows, committed under tests/fixtures: no data folder needed."""
    monkeypatch.setenv("TIRFORGE_DATA", str(FIXTURES))


def shard_lines(root) -> dict[str, int]:
    """Trajectories per store (greedy / sampled), counted from the JSONL shards."""
    counts: dict[str, int] = {}
    for p in root.rglob("shard-*.jsonl"):
        run = next(part for part in p.parts if part in ("greedy", "sampled")
                   or part.startswith("search-"))
        counts[run] = counts.get(run, 0) + len(p.read_text().splitlines())
    return counts


def test_eval_with_a_tiny_random_model_and_resume(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", "--benchmarks", "gsm8k", "--limit", "5", "--n", "2", "--model", model,
            "--max-new-tokens", "16", "--max-turns", "2", "--concurrency", "2",
            "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["rows"]) == {"gsm8k"}
    row = data["rows"]["gsm8k"]
    assert row["problems"] == 5
    assert set(row) == {"problems", "greedy", "maj@2", "pass@2"}  # no --rm: no RM columns
    # A random model does not solve GSM8K; the point is that every figure is a real percentage.
    assert all(0.0 <= row[c] <= 100.0 for c in ("greedy", "maj@2", "pass@2"))
    assert set(data["average"]) == {"greedy", "maj@2", "pass@2"}
    md = (out / "results.md").read_text()
    assert "| benchmark | problems | greedy | maj@2 | pass@2 |" in md
    assert "| gsm8k | 5 |" in md and "| average |" in md
    assert shard_lines(out) == {"greedy": 5, "sampled": 10}
    trajs = [json.loads(line) for p in out.rglob("shard-*.jsonl")
             for line in p.read_text().splitlines()]
    assert {t["model"] for t in trajs} == {model}
    # Greedy runs decode at temperature 0, the samples at eval's 0.7; 16 tokens per turn.
    temps = {t["sampling"]["temperature"] for t in trajs}
    assert temps == {0.0, 0.7}
    assert all(t["sampling"]["max_new_tokens"] == 16 and len(t["steps"]) <= 2 for t in trajs)

    # A second run resumes: no new trajectories, the same table.
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert shard_lines(out) == {"greedy": 5, "sampled": 10}
    assert json.loads((out / "results.json").read_text())["rows"] == data["rows"]


def test_eval_step_search_column_and_resume(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", "--benchmarks", "gsm8k", "--limit", "3", "--n", "2", "--search-beam", "2",
            "--model", model, "--max-new-tokens", "12", "--max-turns", "2",
            "--concurrency", "2", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = json.loads((out / "results.json").read_text())["rows"]["gsm8k"]
    assert set(row) == {"problems", "greedy", "maj@2", "pass@2", "search@2x2"}
    assert 0.0 <= row["search@2x2"] <= 100.0
    assert "search@2x2" in (out / "results.md").read_text()
    assert shard_lines(out) == {"greedy": 3, "sampled": 6, "search-2x2": 3}  # one pick each
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert shard_lines(out) == {"greedy": 3, "sampled": 6, "search-2x2": 3}
