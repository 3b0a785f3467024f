"""Export to a HF Dataset / Parquet with tool-role and fenced message columns."""

import datasets
import pytest

from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.export import save, to_dpo_dataset, to_sft_dataset
from tirforge.trajectories.schema import Step, Trajectory

PROMPT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+3?"}]


def traj(verdict="correct", answer="5"):
    code = "print(2+3)"
    steps = [
        Step(text=f"Compute.\n```python\n{code}\n```", code=code,
             execution=ExecutionResult(stdout="5\n"), output="5"),
        Step(text=f"So \\boxed{{{answer}}}."),
    ]
    return Trajectory(problem="2+3?", problem_id="p/0", messages=PROMPT, steps=steps,
                      verdict=verdict, final_answer=answer, sampling={"temperature": 0.7})


def test_sft_dataset_columns_and_parquet_roundtrip(tmp_path):
    ds = to_sft_dataset([traj(), traj()])
    assert len(ds) == 2
    roles = [m["role"] for m in ds[0]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert ds[0]["messages"][3]["content"] == "5"
    fenced = ds[0]["messages_fenced"]
    assert [m["role"] for m in fenced] == ["system", "user", "assistant"]
    assert "```output\n5\n```" in fenced[2]["content"]
    path = save(ds, tmp_path / "sft.parquet")
    back = datasets.Dataset.from_parquet(str(path))
    assert back[0]["messages"] == ds[0]["messages"] and back[0]["verdict"] == "correct"
    save(ds, tmp_path / "folder")
    assert datasets.load_from_disk(str(tmp_path / "folder"))[1]["problem_id"] == "p/0"


def test_dpo_dataset_is_trl_conversational():
    ds = to_dpo_dataset([(traj(), traj("incorrect", "6"))])
    row = ds[0]
    assert row["prompt"] == PROMPT
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][-1]["content"].endswith("{5}.")
    assert row["rejected"][-1]["content"].endswith("{6}.")


def test_empty_export_is_an_error():
    with pytest.raises(ValueError, match="nothing to export"):
        to_sft_dataset([])


def test_select_and_export_commands(tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app
    from tirforge.trajectories.store import Store

    with Store(tmp_path / "run1") as s:
        for k, (verdict, answer) in enumerate([("correct", "5"), ("correct", "5"),
                                               ("incorrect", "6")]):
            t = traj(verdict, answer)
            t.sample, t.config_hash = k, "h"
            s.add(t)
    with Store(tmp_path / "run2") as s:  # another model: the same path again
        t = traj()
        t.sample, t.config_hash = 0, "other"
        s.add(t)
    runner = CliRunner()
    res = runner.invoke(app, ["select", str(tmp_path / "run1"), str(tmp_path / "run2"),
                              "--out", str(tmp_path / "sft.parquet"),
                              "--dpo-out", str(tmp_path / "dpo")])
    assert res.exit_code == 0, res.output
    sft = datasets.Dataset.from_parquet(str(tmp_path / "sft.parquet"))
    assert len(sft) == 1  # 3 correct trajectories, one distinct path
    assert sft[0]["messages"][3] == {"role": "tool", "content": "5"}
    assert len(datasets.load_from_disk(str(tmp_path / "dpo"))) == 1
    res = runner.invoke(app, ["export", str(tmp_path / "run1"), "--out", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    assert len(datasets.load_from_disk(str(tmp_path / "all"))) == 3
    res = runner.invoke(app, ["select", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
