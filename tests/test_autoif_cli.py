"""``tirforge autoif`` end to end on a scripted model and a real kernel."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.test_autoif import BANANA, LOWER, scripts
from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.common import Paths
from tirforge.apps.cli import app


def test_autoif_cli_runs_stages_and_reports(tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(f"{LOWER}\n{BANANA}\n")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "Describe a cat."}\n')
    s = scripts()
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(s))
    work = tmp_path / "work"
    common = ["--replay", str(replay), "--verifiers", "6", "--min-functions", "2",
              "--min-cases", "3", "--augment-rounds", "1", "--cell-timeout", "1",
              "--max-batch", "6"]
    res = CliRunner().invoke(app, ["autoif", str(work), "--stages",
                                   "seeds,augment,verifiers,crossval,backtranslate,queries",
                                   "--seeds", str(seeds), "--queries", str(queries),
                                   "--queries-per-instruction", "1", *common])
    assert res.exit_code == 0, res.output
    assert "crossval" in res.output and "bad_json 8" in res.output
    pair = jsonl.read(Paths(work).pairs)[0]
    replay.write_text(json.dumps({f"respond:{pair['id']}#{k}": [t]
                                  for k, t in enumerate(["all lower", "Upper"])}))
    res = CliRunner().invoke(app, ["autoif", str(work), "--stages", "responses,export",
                                   "--responses", "2", *common])
    assert res.exit_code == 0, res.output
    assert "sft 1" in res.output and "dpo_pairs 1" in res.output
    res = CliRunner().invoke(app, ["autoif", str(work), "--stages", "bogus"])
    assert res.exit_code == 2 and "unknown stage" in res.output
