"""The co-evolving loop end to end (Qwen2.5-Math's pipeline): per round RM_r is trained on the
round's graded samples, evaluated (held-out AUC, RM@N) and chooses the SFT data; after two rounds
GRPO runs from the last SFT model with the last RM shaping the reward. A replay backend plays
scripted TIR turns in real sandboxed kernels; the policy, RM and GRPO models are tiny random
Llamas with the SmolLM2 tokenizer, really trained. The pipeline is killed after every stage and
in the middle of two (RM scoring, GRPO after its first checkpoint), and each re-run does only
the work left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.pipelines.loop import run_loop
from tirforge.agent.pipelines.loop_config import LoopConfig
from tirforge.agent.pipelines.loop_rm import auc, split_by_problem
from tirforge.agent.pipelines.loop_select import compare_kept
from tirforge.agent.pipelines.loop_train import complete_model

from .test_loop import make_cfg, mtimes, shard_lines, write_problems
from .training_utils import toy_trajectory

pytestmark = pytest.mark.timeout(600)
K = 4


def scripts(data: Path) -> dict[str, list[str]]:
    """Per (problem, sample k): code path k % 2 (two distinct paths), the right answer for
    k = 0, 1, 2 and a wrong one for k = 3, so every problem has 3 of 4 correct (2 distinct
    paths, one repeated) and one incorrect: the RM has pairs to learn from, RFT keeps 2 paths,
    and the RL filter (2-3 of 4) keeps every problem."""
    out = {}
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        a, b = (int(x) for x in row["problem"].split() if x.isdigit())
        codes = [f"print({a} + {b})", f"x = {a}\ny = {b}\nprint(x + y)"]
        for k in range(K):
            ans = int(row["answer"]) + (k == 3)
            out[f"toy/{i}#{k}"] = [f"Let me add.\n```python\n{codes[k % 2]}\n```",
                                   f"So the answer is \\boxed{{{ans}}}."]
    return out


class Factory:
    """Collection backends (by model) and GRPO rollout backends (live model, tokenizer)."""

    def __init__(self, data: Path, fail_rollout_call: int | None = None):
        self.script = scripts(data)
        self.models: list[str] = []
        self.rollout_calls = 0
        self.fail_rollout_call = fail_rollout_call

    def __call__(self, model: str) -> ReplayBackend:
        self.models.append(model)
        return ReplayBackend(self.script)

    def rl(self, model, tokenizer) -> ReplayBackend:
        self.rollout_calls += 1  # one call per GRPO step's rollouts
        if self.rollout_calls == self.fail_rollout_call:
            raise Killed("killed in the middle of GRPO")
        return ReplayBackend(self.script)


class Killed(Exception):
    """Stands for SIGKILL: nothing after it runs but the ``finally`` blocks."""


def coevolve_cfg(tmp_path: Path, **kw) -> LoopConfig:
    write_problems(tmp_path)
    rm = {"enabled": True, "held_out": 0.5, "select_top_k": 1,
          "train": {"num_train_epochs": 2, "learning_rate": 1e-3, "max_length": 256,
                    "per_device_train_batch_size": 2, "report_to": ["none"],
                    "save_steps": 1000, "logging_steps": 1}, **kw.pop("rm", {})}
    rl = {"enabled": True, "samples": K, "min_correct": 2, "max_correct": 3,
          "grpo": {"max_steps": 2, "learning_rate": 1e-3, "max_completion_length": 128,
                   "report_to": ["none"], "save_steps": 1, "logging_steps": 1,
                   "max_new_tokens": 32}, **kw.pop("rl", {})}
    return make_cfg(tmp_path, samples_per_problem=K, infer=kw.pop("infer", {"n": 2}),
                    rm=rm, rl=rl, **kw)


STAGE_LINE = re.compile(r"^(round \d+|rl) (\w+)(: (.*))?$")


def test_coevolving_pipeline_killed_at_every_stage_resumes_without_redoing_work(
        tmp_path, monkeypatch):
    from tirforge.training import rm as rm_module

    cfg = coevolve_cfg(tmp_path)
    run = cfg.run_dir
    factory = Factory(tmp_path / "toy.jsonl", fail_rollout_call=2)
    started: list[str] = []
    killed: set[str] = set()

    def log(msg: str) -> None:
        m = STAGE_LINE.match(msg)
        if m is None:
            return
        what = f"{m[1]} {m[2]}"
        if m[3] is None:
            started.append(what)
        elif m[4] != "done, skipped" and what not in killed:
            killed.add(what)  # the stage's marker is written: kill before anything else
            raise Killed(what)

    # Killed once in the middle of round 0's RM stage: the RM is trained and saved, scoring
    # it dies.
    real_score = rm_module.RewardScorer.score
    state = {"scored": 0}

    def score_once_killed(self, trajectories):
        state["scored"] += 1
        if state["scored"] == 1:
            raise Killed("killed while scoring with RM_0")
        return real_score(self, trajectories)

    monkeypatch.setattr(rm_module.RewardScorer, "score", score_once_killed)
    runs, rows = 0, None
    while rows is None:
        runs += 1
        assert runs < 40
        try:
            rows = run_loop(cfg, factory, log=log, progress=lambda *a: None, rl_backend=factory.rl)
        except Killed:
            continue
    stages = [f"round {r} {s}" for r in (0, 1)
              for s in ("eval", "sample", "collect", "rm", "select", "train")]
    stages += ["round 2 eval", "round 2 sample", "rl filter", "rl train", "rl eval", "rl sample"]
    # Every stage started once, but the two killed in the middle, which started twice.
    assert sorted(started) == sorted(stages + ["round 0 rm", "rl train"])
    assert runs == len(stages) + 2 + 1  # each kill, then the run that finds nothing left

    by_round = {row["round"]: row for row in rows}
    # RM_0 from the policy, RM_1 warm-started from RM_0; RM_0's save was reused after the kill.
    rm0, rm1 = by_round[0]["rm"], by_round[1]["rm"]
    assert (rm0["model"], rm0["init"], rm0["reused"]) == ("round-0/rm/model", "policy", True)
    assert (rm1["model"], rm1["init"], rm1["reused"]) == ("round-1/rm/model", "previous", False)
    for m in (rm0, rm1):
        assert m["loss"] == "listwise" and m["problems"] == 2  # 4 problems, half held out
        assert 0.0 <= m["auc_held_out"] <= 1.0 and 0.0 <= m["rm@2"] <= 1.0
        assert m["trajectories"] == 8 and m["held_out_trajectories"] == 8
    assert complete_model(run / "round-0/rm/model") and complete_model(run / "round-1/rm/model")
    assert not list((run / "round-0/rm/model").glob("checkpoint-*"))

    # RM-guided selection: the top-scored correct path per problem, against RFT's two paths.
    for r in (0, 1):
        sel = by_round[r]["select"]
        assert sel["vs_rft"] == {"rm_kept": 4, "rft_kept": 8, "both": 4, "added": 0,
                                 "dropped": 4, "problems_changed": 4}
        assert sel["rm"] == f"round-{r}/rm/model" and sel["top_k"] == 1
        scores = json.loads((run / f"round-{r}/rm/scores.json").read_text())
        collected = [json.loads(ln) for p in (run / f"round-{r}/collect").glob("shard-*.jsonl")
                     for ln in p.read_text().splitlines()]
        kept = [json.loads(ln) for ln in (run / f"round-{r}/train.jsonl").read_text().splitlines()]
        for t in kept:
            rivals = [c for c in collected if c["problem_id"] == t["problem_id"]
                      and c["verdict"] == "correct"]
            assert len(rivals) == 3
            assert scores[t["id"]] == max(scores[c["id"]] for c in rivals)
            assert t["score"] == pytest.approx(scores[t["id"]])

    # Inference per round: greedy, maj@2 and RM@2 (the last round's with RM_1).
    for r in (0, 1, 2):
        assert by_round[r]["sample"]["problems_scored"] == 4 and "maj@2" in by_round[r]["sample"]
    assert by_round[2]["sample"]["rm"] == "round-1/rm/model" and "rm@2" in by_round[2]["sample"]

    # RL: every problem has 3 of 4 right; GRPO from model_2 with RM_1, resumed at step 2.
    rl = by_round["rl"]
    assert rl["filter"]["kept"] == 4 and rl["filter"]["model"] == "round-1/model"
    tr = rl["train"]
    assert tr["model"] == "rl/model" and tr["init"] == "round-1/model" and tr["problems"] == 4
    assert tr["rm"] == "round-1/rm/model" and tr["alpha"] == 0.5
    assert [p["step"] for p in tr["rewards"]] == [1, 2]  # step 1 from the checkpoint
    assert all(-1.0 < p["reward"] < 1.0 for p in tr["rewards"])
    assert factory.rollout_calls == 3  # step 1, step 2 killed, step 2 again: not step 1 again
    assert complete_model(run / "rl/model") and not list((run / "rl/model").glob("checkpoint-*"))
    import torch
    from safetensors.torch import load_file

    before = load_file(run / "round-1/model/model.safetensors")
    after = load_file(run / "rl/model/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # GRPO changed it
    assert rl["eval"]["model"] == "rl/model" and rl["sample"]["rm"] == "round-1/rm/model"

    summary = (run / "summary.md").read_text()
    assert "| round | policy | greedy % | maj@2 % | RM@2 % |" in summary
    assert "| rl | `rl/model` |" in summary and "RL reward per logged step" in summary
    assert "RM-guided selection" in summary and "4 kept vs 8 by RFT alone" in summary
    assert (run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2, "rl"]

    # A run that finds everything done loads no model and writes nothing.
    before_t, shards = mtimes(run), shard_lines(run)
    again = Factory(tmp_path / "toy.jsonl")
    assert run_loop(cfg, again, log=log, rl_backend=again.rl) == rows
    assert again.models == [] and again.rollout_calls == 0
    assert mtimes(run) == before_t and shard_lines(run) == shards


def test_pairwise_rm_from_the_policy_with_a_floor_nobody_reaches(tmp_path):
    """The pairwise option, warm start from the policy every round, and a score floor that
    drops every path: SFT is skipped, the vs-RFT record says what the RM took away."""
    cfg = coevolve_cfg(tmp_path, rounds=1, infer={"n": 0}, rl={"enabled": False},
                       rm={"init": "policy", "select_min_score": 1e9, "select_top_k": None,
                           "train": {"loss": "pairwise", "max_length": 256, "max_steps": 1,
                                     "report_to": ["none"]}})
    factory = Factory(tmp_path / "toy.jsonl")
    rows = run_loop(cfg, factory)
    r0 = rows[0]
    assert r0["rm"]["loss"] == "pairwise" and r0["rm"]["init"] == "policy"
    assert "rm@2" not in r0["rm"]  # no sampled inference asked for
    sel = r0["select"]
    assert sel["below_score"] == 12 and sel["kept"] == 0
    assert sel["vs_rft"]["rft_kept"] == 8 and sel["vs_rft"]["dropped"] == 8
    assert r0["train"]["skipped"] is True and not (cfg.run_dir / "rl").exists()


def test_auc_split_and_kept_set_comparison():
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.1, 0.8, 0.9], [True, True, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([1.0, 2.0], [True, True]) is None
    trajs = [toy_trajectory(a, 1, problem_id=f"p{a}") for a in range(8)]
    held_in, held_out = split_by_problem(trajs, 0.25, seed=3)
    assert len(held_out) == 2 and len(held_in) == 6
    assert split_by_problem(trajs, 0.25, seed=3) == (held_in, held_out)  # seeded
    assert split_by_problem(trajs[:1], 0.5, seed=0) == (trajs[:1], [])  # never all held out
    a, b = trajs[:3], trajs[1:5]
    assert compare_kept(a, b) == {"rm_kept": 3, "rft_kept": 4, "both": 2, "added": 1,
                                  "dropped": 2, "problems_changed": 3}


def test_coevolution_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="rm_filter"):
        LoopConfig.from_dict({"rm": {"enabled": True}, "rm_filter": "x"})
    with pytest.raises(ValueError, match="rm.init"):
        LoopConfig.from_dict({"rm": {"init": "base"}})
    with pytest.raises(ValueError, match=r"rm\.train\.model, rm\.train\.output_dir: set by"):
        LoopConfig.from_dict({"rm": {"train": {"model": "x", "output_dir": "y"}}})
    with pytest.raises(ValueError, match=r"rl\.grpo\.rm_path: set by the loop"):
        LoopConfig.from_dict({"rl": {"grpo": {"rm_path": "x"}}})
    with pytest.raises(ValueError, match="min_correct <= max_correct"):
        LoopConfig.from_dict({"rl": {"min_correct": 6, "max_correct": 5}})
    with pytest.raises(ValueError, match="LoopConfig.rm must be a mapping"):
        LoopConfig.from_dict({"rm": 3})
    with pytest.raises(ValueError, match=r"unknown LoopConfig fields: rm\.nope"):
        LoopConfig.from_dict({"rm": {"nope": 1}})
    cfg = LoopConfig()
    assert (cfg.rm.train.loss, cfg.rm.train.max_group_size) == ("listwise", 6)
    assert (cfg.rl.samples, cfg.rl.min_correct, cfg.rl.max_correct) == (8, 2, 5)
    assert cfg.rl.grpo.rm_alpha == 0.5 and cfg.infer.n == 0 and not cfg.rm.enabled


def test_shipped_coevolution_configs_load():
    configs = Path(__file__).parents[1] / "configs"
    cpu = LoopConfig.from_yaml(configs / "loop-coevolve-cpu.yaml")
    assert cpu.model == "smollm2" and cpu.rm.enabled and cpu.rl.enabled and cpu.infer.n == 2
    assert cpu.rm.train.loss == "listwise" and cpu.rm.train.max_group_size == 6
    gpu = LoopConfig.from_yaml(configs / "loop-gpu.yaml")
    assert gpu.rm.enabled and gpu.rl.enabled and gpu.infer.n == 8 and gpu.backend == "vllm"
    assert (gpu.rl.samples, gpu.rl.min_correct, gpu.rl.max_correct) == (8, 2, 5)
    assert gpu.rl.grpo.rm_alpha == 0.5 and gpu.rm.train.bf16


def test_rl_with_no_problem_in_range_is_skipped_and_keeps_the_model(tmp_path):
    """Every problem has 3 of 4 right: a 4-of-4 filter keeps none, GRPO is skipped and the
    unchanged model is not evaluated twice; rounds: 0 starts RL from the base model."""
    cfg = coevolve_cfg(tmp_path, rounds=0, infer={"n": 0}, rm={"enabled": False},
                       rl={"min_correct": 4, "max_correct": 4})
    factory = Factory(tmp_path / "toy.jsonl")
    rows = run_loop(cfg, factory, rl_backend=factory.rl)
    rl = rows[-1]
    assert rl["round"] == "rl" and rl["filter"]["kept"] == 0
    assert rl["filter"]["correct_per_problem"] == {"0": 0, "1": 0, "2": 0, "3": 4}
    assert rl["train"]["skipped"] is True and rl["train"]["model"] == cfg.model
    assert "eval" not in rl and factory.rollout_calls == 0
    assert sorted(p.name for p in (cfg.run_dir / "rl").iterdir()) == [
        "filter", "filter.done", "problems.jsonl", "train.done"]
    assert "RL skipped, model unchanged" in (cfg.run_dir / "summary.md").read_text()
