"""`tirforge loop` end to end: a replay backend plays correct (or wrong) TIR solutions in real
sandboxed kernels, selection yields data, and SFT really trains a tiny random Llama with the
SmolLM2 tokenizer; then resume, interruption between stages, zero data, and the CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.pipelines.loop import check_disjoint, load_splits, run_loop, split_problems
from tirforge.agent.pipelines.loop_config import LoopConfig
from tirforge.agent.pipelines.loop_report import bootstrap_ci
from tirforge.agent.pipelines.loop_train import complete_model
from tirforge.trajectories.datasets import Problem

from .data_files import full_data
from .training_utils import tiny_model_dir

pytestmark = pytest.mark.timeout(300)
CONFIGS = Path(__file__).parents[1] / "configs"
K = 2


def write_problems(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "toy.jsonl"
    rows = [{"problem": f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many now?",
             "answer": str(3 * i + 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scripts(data: Path, wrong: bool | None = None) -> dict[str, list[str]]:
    """A replay script per (problem, sample): two distinct code paths per problem; answers are
    right on even rows and wrong on odd ones (``wrong``: all right / all wrong)."""
    out = {}
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        a, b = (int(x) for x in row["problem"].split() if x.isdigit())
        bad = (i % 2 == 1) if wrong is None else wrong
        ans = int(row["answer"]) + (1 if bad else 0)
        codes = [f"print({a} + {b})", f"x = {a}\ny = {b}\nprint(x + y)"]
        for k in range(K):
            out[f"toy/{i}#{k}"] = [f"Let me add.\n```python\n{codes[k]}\n```",
                                   f"So the answer is \\boxed{{{ans}}}."]
    return out


class Factory:
    """Backend factory: records which model each round asked for, replays the scripts."""

    def __init__(self, data: Path, wrong: bool | None = None):
        self.data, self.wrong, self.models = data, wrong, []

    def __call__(self, model: str) -> ReplayBackend:
        self.models.append(model)
        return ReplayBackend(scripts(self.data, self.wrong))


def make_cfg(tmp_path: Path, **kw) -> LoopConfig:
    """A config as a YAML file would give it (nested sections); ``sft`` entries in ``kw`` are
    added to the section."""
    data = tmp_path / "toy.jsonl"
    if not data.exists():
        write_problems(tmp_path)
    model = kw.pop("model", None) or tiny_model_dir(tmp_path)
    sft = {"num_train_epochs": 1, "learning_rate": 1e-3, "max_length": 256,
           "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
           "report_to": ["none"], "save_steps": 1000, **kw.pop("sft", {})}
    base = dict(
        name="t", out_dir=str(tmp_path / "runs"), model=model, train_dataset=str(data),
        train_start=0, train_limit=4, eval_dataset=str(data), eval_start=4, eval_limit=4,
        rounds=2, samples_per_problem=K, concurrency=2, max_per_problem=4,
        agent={"max_turns": 3, "sampling": {"temperature": 0.7, "max_new_tokens": 64}},
        executor={"sandbox": "auto"}, sft=sft, bootstrap_samples=500,
    )
    return LoopConfig.from_dict({**base, **kw})


def shard_lines(run: Path) -> dict[str, int]:
    """Stored trajectories per round and stage folder."""
    counts: dict[str, int] = {}
    for p in run.rglob("shard-*.jsonl"):
        key = f"{p.parts[-3]}/{p.parts[-2]}"
        counts[key] = counts.get(key, 0) + len(p.read_text().splitlines())
    return counts


def mtimes(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns
            for p in run.rglob("*") if p.is_file() and p.suffix in (".done", ".safetensors")}


def test_loop_end_to_end_then_rerun_skips_everything(tmp_path):
    cfg = make_cfg(tmp_path)
    factory = Factory(tmp_path / "toy.jsonl")
    logged: list[str] = []
    rows = run_loop(cfg, factory, log=logged.append)
    run = cfg.run_dir
    # Without a terminal (a log file) progress comes as lines: here the last one of each stage.
    assert "round 0 collect: 8/8 trajectories" in "\n".join(logged)

    # Layout: rounds 0 and 1 collect, select and train; round 2 only evaluates model_2.
    for r in (0, 1):
        rd = run / f"round-{r}"
        for stage in ("eval", "collect", "select", "train"):
            assert (rd / f"{stage}.done").exists(), (r, stage)
        assert (rd / "train.jsonl").exists() and complete_model(rd / "model")
        assert not list((rd / "model").glob("checkpoint-*"))  # removed once training finished
    assert sorted(p.name for p in (run / "round-2").iterdir()) == ["eval", "eval.done"]
    for name in ("config.yaml", "metrics.jsonl", "summary.md", "progress.png"):
        assert (run / name).exists(), name
    assert (run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Each round's backend loads that round's model: the base, then the models SFT made.
    assert factory.models == [cfg.model, str((run / "round-0/model").resolve()),
                              str((run / "round-1/model").resolve())]
    assert shard_lines(run) == {"round-0/eval": 4, "round-0/collect": 8, "round-1/eval": 4,
                                "round-1/collect": 8, "round-2/eval": 4}

    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == json.loads(json.dumps(rows)) and [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        ev = m["eval"]
        assert ev["problems"] == 4 and ev["ci_low"] <= ev["accuracy"] <= ev["ci_high"]
        assert sum(ev["outcomes"].values()) == 4
    r0 = metrics[0]
    # The replay solves every even row: the counts follow from which rows each split holds.
    train_ids, eval_ids = (
        [int(p.id.split("/")[1]) for p in ps] for ps in load_splits(cfg))
    n_even_eval = sum(i % 2 == 0 for i in eval_ids)
    assert r0["eval"]["correct"] == n_even_eval
    assert r0["eval"]["outcomes"].get("incorrect", 0) == 4 - n_even_eval
    n_even = sum(i % 2 == 0 for i in train_ids)
    assert r0["collect"]["correct"] == K * n_even
    assert r0["collect"]["correct_per_problem"] == {
        "0": 4 - n_even, **({"1": 0, "2": n_even} if n_even else {})}
    sel = r0["select"]
    assert (sel["correct"], sel["distinct"], sel["kept"]) == (K * n_even,) * 3  # 2 distinct paths
    assert sel["dedup_ratio"] == (1.0 if n_even else None)
    assert r0["train"] == {**r0["train"], "skipped": False, "model": "round-0/model",
                           "examples": K * n_even, "reused": False}
    assert "train" not in metrics[2] and "collect" not in metrics[2]

    summary = (run / "summary.md").read_text()
    assert "| round | model | eval acc % (CI) |" in summary
    assert "| 0 | `" + cfg.model + "` |" in summary and "| 2 | `round-1/model` |" in summary
    assert "correct samples per problem" in summary and "dedup ratio" in summary

    # Re-run: every stage is skipped, no model is loaded, nothing is written again.
    before, lines = mtimes(run), shard_lines(run)
    again = Factory(tmp_path / "toy.jsonl")
    assert run_loop(cfg, again) == rows
    assert again.models == [] and shard_lines(run) == lines and mtimes(run) == before

    # A complete model folder is reused even when its marker is gone (killed after saving).
    (run / "round-0" / "train.done").unlink()
    weights = (run / "round-0/model/model.safetensors").stat().st_mtime_ns
    rows = run_loop(cfg, again)
    assert rows[0]["train"]["reused"] is True and again.models == []
    assert (run / "round-0/model/model.safetensors").stat().st_mtime_ns == weights


def test_interrupted_run_resumes_without_redoing_round_0(tmp_path):
    # rounds=1 stands for a run killed after round 1's eval; LoRA covers the adapter merge.
    cfg = make_cfg(tmp_path, rounds=1, save_dtype="bfloat16",
                   sft={"lora": True, "lora_r": 4, "lora_alpha": 8})
    first = Factory(tmp_path / "toy.jsonl")
    run_loop(cfg, first)
    run = cfg.run_dir
    assert complete_model(run / "round-0/model") and (run / "round-0/adapter").is_dir()
    assert not (run / "round-1/collect.done").exists() and (run / "round-1/eval.done").exists()
    before, lines = mtimes(run), shard_lines(run)

    cfg.rounds = 2  # allowed: it only adds rounds
    second = Factory(tmp_path / "toy.jsonl")
    rows = run_loop(cfg, second)
    assert [r["round"] for r in rows] == [0, 1, 2]
    after = mtimes(run)
    assert {k: v for k, v in after.items() if k in before} == before  # round 0 not redone
    assert {k: v for k, v in shard_lines(run).items() if k in lines} == lines
    # Round 1 collects with model_1 (round 1's eval was already done); round 2 evaluates model_2.
    assert second.models == [str((run / "round-0/model").resolve()),
                             str((run / "round-1/model").resolve())]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "round-1/model")  # plain, loadable
    assert next(model.parameters()).dtype == torch.bfloat16  # save_dtype

    # Settings that change what a stage produces are locked to the run.
    cfg.samples_per_problem = 3
    with pytest.raises(ValueError, match="samples_per_problem"):
        run_loop(cfg, second)


def test_zero_selected_examples_skip_sft_and_rm_filter(tmp_path):
    rm = tiny_model_dir(tmp_path, num_labels=1)
    # Every answer right, but an RM floor nobody reaches: nothing is kept, SFT is skipped.
    cfg = make_cfg(tmp_path, rounds=1, rm_filter=rm, rm_threshold=1e9)
    factory = Factory(tmp_path / "toy.jsonl", wrong=False)
    rows = run_loop(cfg, factory)
    r0 = rows[0]
    assert r0["collect"]["correct"] == 8
    assert r0["select"]["below_score"] == 8 and r0["select"]["kept"] == 0
    assert "rm_mean" in r0["select"]
    assert r0["train"]["skipped"] is True and r0["train"]["model"] == cfg.model
    assert not (cfg.run_dir / "round-0/model").exists()
    # Round 1 evaluates the unchanged base model.
    assert rows[1]["eval"]["model"] == cfg.model and factory.models == [cfg.model]
    summary = (cfg.run_dir / "summary.md").read_text()
    assert "skipped: no data, model unchanged" in summary and "below the RM threshold" in summary


class EvolvingFactory(Factory):
    """Also answers the evolution prompts (untagged) with two new problems, then solves them."""

    NEW = ["Tom has 100 apples and buys 1 more. How many now?",
           "Tom has 200 apples and buys 2 more. How many now?"]

    def __call__(self, model: str) -> ReplayBackend:
        self.models.append(model)
        extra = {"You rewrite math word problems": [f"New problem: {p}" for p in self.NEW]}
        for p, ans in zip(self.NEW, (101, 202), strict=True):
            extra[p] = ["```python\nprint(1)\n```", f"\\boxed{{{ans}}}"]
        return ReplayBackend({**scripts(self.data, self.wrong), **extra})


def test_evolved_problems_join_the_collection(tmp_path):
    cfg = make_cfg(tmp_path, rounds=1, evolve=True, evolve_seeds=2,
                   evolve_types=["change_numbers"], evolve_label_samples=2)
    factory = EvolvingFactory(tmp_path / "toy.jsonl")
    rows = run_loop(cfg, factory)
    rd = cfg.run_dir / "round-0"
    assert rows[0]["evolve"]["new"] == 2 and rows[0]["evolve"]["accepted"] == 2
    evolved = [json.loads(ln) for ln in (rd / "evolve/evolved.jsonl").read_text().splitlines()]
    assert [(p["problem"], p["reference"]) for p in evolved] == list(
        zip(EvolvingFactory.NEW, ("101", "202"), strict=True))
    assert all(p["id"].startswith("evolved-r0/toy/") for p in evolved)
    c = rows[0]["collect"]
    assert (c["problems"], c["evolved_problems"], c["trajectories"]) == (6, 2, 12)
    assert "evolve: 2 rewrites asked, 2 new problems, 2 accepted" in (
        cfg.run_dir / "summary.md").read_text()
    # The labelled problems were trained on: every evolved sample is correct.
    kept = [json.loads(ln) for ln in (rd / "train.jsonl").read_text().splitlines()]
    assert sum(t["problem_id"].startswith("evolved-") for t in kept) == 2  # one path each


def test_bootstrap_ci_on_known_data():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0, 0.0)
    mean, low, high = bootstrap_ci([1.0] * 50 + [0.0] * 50, samples=4000, seed=1)
    # Normal approximation: 0.5 ± 1.96 * sqrt(0.25 / 100) = [0.402, 0.598].
    assert mean == 0.5
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_ci([1.0] * 50 + [0.0] * 50, samples=4000, seed=1) == (mean, low, high)
    _, low90, high90 = bootstrap_ci([1.0] * 50 + [0.0] * 50, samples=4000, seed=1, level=0.9)
    assert low < low90 < high90 < high


def test_shipped_configs_load():
    for name in ("loop-cpu.yaml", "loop-gpu.yaml"):
        cfg = LoopConfig.from_yaml(CONFIGS / name)
        assert cfg.rounds >= 1
    cpu = LoopConfig.from_yaml(CONFIGS / "loop-cpu.yaml")
    assert cpu.backend == "transformers" and cpu.model == "smollm2"
    gpu = LoopConfig.from_yaml(CONFIGS / "loop-gpu.yaml")
    assert gpu.backend == "vllm" and Path(gpu.sft_accelerate_config).exists()
    with pytest.raises(ValueError, match="unknown LoopConfig fields"):
        LoopConfig.from_yaml(CONFIGS / "loop-cpu.yaml", nope=1)


def test_shipped_cpu_config_splits_are_disjoint(monkeypatch):
    monkeypatch.setenv("TIRFORGE_DATA", str(full_data()))  # the config slices the full MAWPS set
    cpu = LoopConfig.from_yaml(CONFIGS / "loop-cpu.yaml")
    train, held = load_splits(cpu)  # the real MAWPS rows: raises on any overlap
    assert len(train) == cpu.train_limit and len(held) == cpu.eval_limit


def test_overlap_between_train_and_eval_is_refused(tmp_path):
    a = Problem("a/0", "What is  2 + 2?", "4")
    check_disjoint([a], [Problem("b/0", "What is 3 + 3?", "6")])
    with pytest.raises(ValueError, match="1 shared problem texts"):
        check_disjoint([a], [Problem("b/0", "what is 2 + 2?", "4")])  # same text, other id
    with pytest.raises(ValueError, match="1 shared ids"):
        check_disjoint([a], [Problem("a/0", "Something else", "1")])
    data = write_problems(tmp_path)
    # One dataset, overlapping ranges: refused before any work starts.
    cfg = make_cfg(tmp_path, model="unused", train_limit=6, eval_start=4)
    with pytest.raises(ValueError, match="overlap"):
        run_loop(cfg, Factory(data))
    # Repeated texts inside a dataset are dropped before slicing.
    dup = tmp_path / "dup.jsonl"
    dup.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    assert len(split_problems(str(dup), 0, None, shuffle=True, seed=0)) == 10


def test_loop_command_is_registered():
    from tirforge.apps.cli import app

    r = CliRunner().invoke(app, ["loop", "--help"])
    assert r.exit_code == 0 and "--config" in r.output


def test_old_flat_keys_and_unknown_keys_are_refused_by_name(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("max_turns: 3\ncell_timeout: 5\nexecutor: docker\nsft_lr: 1.0e-5\n"
                   "sft_extra: {warmup_steps: 0.1}\n")
    with pytest.raises(ValueError) as e:
        LoopConfig.from_yaml(old)
    for spelled in ("max_turns -> agent.max_turns", "cell_timeout -> executor.timeout",
                    "executor -> executor.backend", "sft_lr -> sft.learning_rate",
                    "sft_extra -> sft.<field>"):
        assert spelled in str(e.value)
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("agent: {max_turn: 3}\n",
         r"unknown LoopConfig fields: agent.max_turn \(did you mean agent.max_turns\?\)"),
        ("agent: {sampling: {temp: 1}}\n", r"unknown LoopConfig fields: agent.sampling.temp"),
        ("executor: {timeout: 5, nope: 1}\n", r"unknown LoopConfig fields: executor.nope$"),
        ("sft: {model: x}\n", r"sft.model: set by the loop"),
        ("agent: 3\n", "LoopConfig.agent must be a mapping"),
        ("agent: {format: nonsense}\n", "nonsense"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            LoopConfig.from_yaml(bad)


def test_every_unknown_key_is_reported_at_once_with_a_suggestion(tmp_path):
    bad = tmp_path / "typos.yaml"
    bad.write_text("roundz: 3\nmax_turns: 2\nagent: {max_turn: 3, sampling: {temperatur: 1}}\n"
                   "executor: {timout: 5, zzz: 1}\nsft: {learning_rat: 1.0e-5}\n")
    with pytest.raises(ValueError) as e:
        LoopConfig.from_yaml(bad)
    msg = str(e.value)
    assert "max_turns -> agent.max_turns" in msg  # the old flat key, in the same error
    for shown in ("roundz (did you mean rounds?)", "agent.max_turn (did you mean agent.max_turns?)",
                  "agent.sampling.temperatur (did you mean agent.sampling.temperature?)",
                  "executor.timout (did you mean executor.timeout?)", "executor.zzz,",
                  "sft.learning_rat (did you mean sft.learning_rate?)"):
        assert shown in msg, (shown, msg)


def test_sections_merge_onto_the_loop_defaults(tmp_path):
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig

    cfg = LoopConfig.from_dict({"agent": {"sampling": {"top_p": 0.9}}, "sft": {"lora": True},
                                "executor": {"timeout": 3}})
    default = LoopConfig()
    assert cfg.agent.sampling.top_p == 0.9
    assert cfg.agent.sampling.max_new_tokens == default.agent.sampling.max_new_tokens == 384
    assert cfg.agent.max_turns == 4 and cfg.sft.lora and cfg.sft.num_train_epochs == 2.0
    assert cfg.executor_config().timeout == 3 and cfg.executor_config().pool_size == 8
    # Eval is greedy with the eval budgets; the shipped CPU config keeps its former settings.
    cpu = LoopConfig.from_yaml(CONFIGS / "loop-cpu.yaml")
    assert cpu.agent == AgentConfig(format="qwen-tir", max_turns=3, sampling=SamplingParams(
        max_new_tokens=192, temperature=0.7, top_p=1.0))
    assert cpu.eval_agent().sampling == SamplingParams(max_new_tokens=192, temperature=0.0)
    assert (cpu.executor.timeout, cpu.sft.learning_rate, cpu.sft.save_steps) == (10, 5e-5, 10)


def test_a_run_locked_with_the_old_flat_keys_is_still_read(tmp_path):
    import yaml

    from tirforge.agent.pipelines.loop_config import check_run_config
    from tirforge.training.config import to_plain

    cfg = make_cfg(tmp_path, model="unused")
    d = to_plain(cfg)  # what an earlier version locked: the same settings, flat
    agent, ex, sft = d.pop("agent"), d.pop("executor"), d.pop("sft")
    d.update(format=agent["format"], max_turns=agent["max_turns"],
             temperature=agent["sampling"]["temperature"], top_p=agent["sampling"]["top_p"],
             max_new_tokens=agent["sampling"]["max_new_tokens"], cell_timeout=ex["timeout"],
             executor=ex["backend"], sandbox=ex["sandbox"], sft_epochs=sft["num_train_epochs"],
             sft_lr=sft["learning_rate"], sft_lora=sft["lora"], sft_max_length=sft["max_length"],
             sft_batch_size=sft["per_device_train_batch_size"],
             sft_grad_accum=sft["gradient_accumulation_steps"],
             sft_extra={"report_to": ["none"], "save_steps": 1000})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(d))
    check_run_config(cfg)  # same settings: accepted, and the lock is rewritten nested
    assert "agent" in yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    cfg.executor.timeout = 3.0
    with pytest.raises(ValueError, match=r"executor\.timeout differ"):
        check_run_config(cfg)
    cfg.executor.timeout, cfg.executor.sandbox = 10.0, "none"  # the sandbox may change
    check_run_config(cfg)


def test_the_documented_runs_flat_lock_maps_onto_the_shipped_nested_config():
    """docs/loop-cpu-run/config.yaml was locked by the flat version of configs/loop-cpu.yaml."""
    from tirforge.agent.pipelines.loop_config import migrate_flat
    from tirforge.training.config import build, flatten, load_yaml, to_plain

    lock = load_yaml(Path(__file__).parents[1] / "docs/loop-cpu-run/config.yaml")
    assert "sft_extra" in lock and "cell_timeout" in lock
    old = flatten(to_plain(build(LoopConfig, migrate_flat(lock))))
    new = flatten(to_plain(LoopConfig.from_yaml(CONFIGS / "loop-cpu.yaml")))
    assert {k for k in old if old[k] != new[k]} == {"rounds"}  # that run was one round
