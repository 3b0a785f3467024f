"""`tirforge eval` end to end on a 5-problem slice (replay backend, real kernels, GSM8K rows)."""

import json

import pytest
from typer.testing import CliRunner

from tirforge.agent.pipelines.evaluate import choice_letter, is_correct
from tirforge.apps.cli import app
from tirforge.trajectories.schema import Trajectory

from .data_files import FIXTURES

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _gsm8k_fixture(monkeypatch):
    """GSM8K's first test rows, committed under tests/fixtures: no data folder needed."""
    monkeypatch.setenv("TIRFORGE_DATA", str(FIXTURES))


def test_choice_letters():
    assert choice_letter("B") == "B"
    assert choice_letter("(c)") == "C"
    assert choice_letter("\\text{(D)} 12") == "D"
    assert choice_letter("12") is None and choice_letter(None) is None
    t = Trajectory(problem="q", reference="C", final_answer="(C)", verdict="incorrect")
    assert is_correct(t)
    assert not is_correct(t.model_copy(update={"final_answer": "B"}))


def test_eval_table_and_resume(tmp_path):
    turns = tmp_path / "turns.json"
    # Every problem gets the same script: compute 18 in the kernel, answer 18. GSM8K's first
    # test problem's answer is 18, the next four differ: greedy accuracy must be 20.0.
    turns.write_text(json.dumps(["```python\nprint(9 * 2)\n```", "So \\boxed{18}."]))
    args = ["eval", "--benchmarks", "gsm8k", "--limit", "5", "--n", "2", "--replay", str(turns),
            "--out", str(tmp_path / "eval"), "--concurrency", "2", "--sandbox", "bwrap"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    row = data["rows"]["gsm8k"]
    assert row["problems"] == 5
    assert row["greedy"] == pytest.approx(20.0)
    assert row["maj@2"] == pytest.approx(20.0) and row["pass@2"] == pytest.approx(20.0)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| gsm8k | 5 | 20.0 | 20.0 | 20.0 |" in md and "| average |" in md
    shards = list((tmp_path / "eval").rglob("shard-*.jsonl"))
    lines = sum(len(p.read_text().splitlines()) for p in shards)
    assert lines == 5 + 10  # greedy + 2 samples each
    # A second run resumes: nothing new is solved, the same table comes out.
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    shards = list((tmp_path / "eval").rglob("shard-*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in shards) == lines
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["rows"] == data["rows"]
