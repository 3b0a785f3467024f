"""`tirforge train ...` options are generated from the trainer config dataclasses: every simple
field is an option, the spellings users have keep working, YAML < options, and `train grpo`
gives its rollouts the executor timeout of its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tirforge.apps.cli import app

CONFIGS = Path(__file__).parents[1] / "configs"


def fake_model(tmp_path: Path) -> str:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def captured(monkeypatch, module: str) -> list:
    seen: list = []
    monkeypatch.setattr(f"tirforge.training.{module}.train",
                        lambda cfg, *rest: seen.append((cfg, rest)) or cfg.output_dir)
    return seen


@pytest.mark.parametrize("trainer,extra,check", [
    ("sft", ["--all", "--lora", "--resume", "latest", "--learning-rate", "3e-4"],
     lambda c: (not c.only_correct and c.lora and c.resume_from_checkpoint == "latest"
                and c.learning_rate == 3e-4)),
    ("rm", ["--loss", "listwise", "--listwise-mode", "pairs", "--no-lora"],
     lambda c: c.loss == "listwise" and c.listwise_mode == "pairs" and not c.lora),
    ("dpo", ["--beta", "0.25", "--style", "tool", "--max-steps", "2"],
     lambda c: c.beta == 0.25 and c.style == "tool" and c.max_steps == 2),
])
def test_options_override_the_yaml(monkeypatch, tmp_path, trainer, extra, check):
    seen = captured(monkeypatch, trainer)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text("")  # the trainer is replaced: only its existence counts
    r = CliRunner().invoke(app, ["train", trainer, "-c", str(CONFIGS / f"{trainer}_cpu_tiny.yaml"),
                                 "--model", fake_model(tmp_path), "--train-file", "t.jsonl",
                                 "--output-dir", str(out), *extra])
    assert r.exit_code == 0, r.output
    (cfg, _), = seen
    assert cfg.output_dir == str(out) and cfg.train_file == "t.jsonl" and check(cfg)
    # Fields no option named keep the YAML's values.
    import yaml

    data = yaml.safe_load((CONFIGS / f"{trainer}_cpu_tiny.yaml").read_text())
    assert data["model"] == "smollm2" and cfg.model != "smollm2"
    for key in ("logging_steps", "save_steps", "max_length", "report_to"):
        if key in data:
            assert getattr(cfg, key) == data[key], key


def test_every_simple_field_is_an_option_and_lists_stay_yaml_only():
    r = CliRunner().invoke(app, ["train", "sft", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--train-file", "--output-dir", "--max-steps", "--lora", "--no-lora",
                 "--only-correct", "--all", "--warmup-steps", "--lora-r", "--chat-template",
                 "--config", "-c"):
        assert flag in r.output, flag
    assert "--report-to" not in r.output and "--mixture" not in r.output


def test_unknown_option_and_bad_yaml_are_refused(tmp_path):
    r = CliRunner().invoke(app, ["train", "sft", "--nonsense", "1"])
    assert r.exit_code == 2 and "nonsense" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1\n")
    r = CliRunner().invoke(app, ["train", "sft", "-c", str(bad), "--model", fake_model(tmp_path),
                                 "--train-file", "t.jsonl"])
    assert r.exit_code == 2 and "lerning_rate" in r.output


def test_grpo_rollouts_get_the_executor_timeout_of_the_config(monkeypatch, tmp_path):
    import tirforge.executors as executors

    made = []

    class Kernel:
        def start(self):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def make_executor(cfg):
        made.append(cfg)
        return Kernel()

    monkeypatch.setattr(executors, "make_executor", make_executor)
    seen = captured(monkeypatch, "grpo")
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    rm = fake_model(tmp_path)
    r = CliRunner().invoke(app, ["train", "grpo", "-c", str(CONFIGS / "grpo_cpu_tiny.yaml"),
                                 "--problems", str(problems), "--model", rm, "--rm", rm,
                                 "--timeout", "3.5", "--sandbox", "none", "--max-turns", "2"])
    assert r.exit_code == 0, r.output
    (cfg, (rollout, rows)), = seen
    assert (made[0].timeout, made[0].sandbox, made[0].backend) == (3.5, "none", "local")
    assert cfg.rm_path == rm and cfg.max_turns == 2 and callable(rollout)
    assert rows[0]["problem"] == "What is 2 + 3?"
