"""The loop's final RL stage (``<run>/rl/``): GRPO from the last SFT model with the last reward
model shaping the reward, r = σ(α · r_m) + (r_v - 1) (Qwen2.5-Math; ``training.grpo``).

Stages, each with its marker in ``rl/`` like a round's:

1. ``filter``: ``rl.samples`` sampled trajectories per training problem with model_R; problems
   with ``min_correct``..``max_correct`` correct (the report: 2-5 of 8) are neither trivial
   nor hopeless and go to ``rl/problems.jsonl``.
2. ``train``: GRPO on them. Rollouts are the agent graph on the loop's kernel pool
   (``agent.pipelines.rollout.agent_rollout``: concurrent, token-faithful), the live policy as
   the model (tests inject a replay backend). The model goes to ``rl/model``, TRL's log
   (the reward curve) to ``rl/model/trainer_state.json`` and the marker.
3. ``eval`` and ``sample``: the RL model as a round's model is evaluated (greedy; maj@N and
   RM@N with the last RM).

Resuming: as a round's stages; an interrupted GRPO resumes from its latest checkpoint
(``rl.grpo.save_steps``), a complete ``rl/model`` is reused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_config import write_atomic
from tirforge.agent.pipelines.loop_eval import collect_into, rm_label
from tirforge.agent.pipelines.loop_report import finish_stage, histogram, read_marker
from tirforge.agent.pipelines.loop_rm import final_rm
from tirforge.agent.pipelines.loop_train import complete_model
from tirforge.trajectories.datasets import Problem

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop import Session


def stage_filter(s: Session, rd: Path, model_label: str, model: str) -> dict:
    """Sample every training problem ``rl.samples`` times with model_R; keep the problems whose
    correct count lies in [min_correct, max_correct] (at most ``max_problems``)."""
    cfg, t0, rl = s.cfg, time.perf_counter(), s.cfg.rl
    rep, cfg_hash, trajs = collect_into(s, "rl filter", s.train, rl.samples, rd / "filter",
                                        model_label, model, cfg.agent, "rl-filter")
    correct = Counter(t.problem_id for t in trajs if t.verdict == "correct")
    kept = [p for p in s.train if rl.min_correct <= correct[p.id] <= rl.max_correct]
    kept = kept[:rl.max_problems] if rl.max_problems is not None else kept
    write_atomic(rd / "problems.jsonl", "".join(
        json.dumps({"problem_id": p.id, "problem": p.problem, "reference": p.reference},
                   ensure_ascii=False) + "\n" for p in kept))
    return finish_stage(rd, "filter", {
        "model": model_label, "config_hash": cfg_hash, "problems": len(s.train),
        "kept": len(kept), "trajectories": len(trajs), "correct": sum(correct.values()),
        "correct_per_problem": histogram([correct[p.id] for p in s.train]),
        "range": [rl.min_correct, rl.max_correct], "failed": rep.failed if rep else 0,
        "seconds": round(time.perf_counter() - t0, 1)})


def reward_curve(history: list[dict]) -> list[dict]:
    """TRL's log rows that carry a reward: step, reward (mean shaped reward), its std and the
    verifier / RM terms when logged (``rewards/<func>/mean``)."""
    keep = ("reward", "reward_std", "rewards/verifier_reward/mean",
            "rewards/rm_shaping/mean", "loss", "tir/code_cells")
    return [{"step": h.get("step"), **{k: h[k] for k in keep if k in h}}
            for h in history if "reward" in h]


def stage_rl_train(s: Session, rd: Path, model_label: str, init: str,
                   rl_backend: Any = None) -> dict:
    """GRPO from ``init`` (model_R's folder) on the filtered problems with the final RM;
    ``rl_backend(model, tokenizer) -> backend`` replaces the live-policy backend."""
    from tirforge.agent.pipelines.rollout import agent_rollout, prompt_key
    from tirforge.agent.runner import RunnerConfig
    from tirforge.training import grpo

    cfg, t0, rl = s.cfg, time.perf_counter(), s.cfg.rl
    problems = [Problem(d["problem_id"], d["problem"], d["reference"]) for d in
                (json.loads(ln) for ln in (rd / "problems.jsonl").read_text().splitlines())]
    rm = final_rm(cfg) if rl.use_rm else None
    if not problems:
        return finish_stage(rd, "train", {
            "skipped": True, "model": model_label, "problems": 0, "rewards": [],
            "reason": f"no training problem with {rl.min_correct}-{rl.max_correct} of "
                      f"{rl.samples} samples correct: RL skipped, model unchanged"})
    dest = rd / "model"
    out = rd / "grpo" if cfg.save_dtype else dest  # a cast writes the plain folder afterwards
    reused = complete_model(dest)
    if not reused:
        s.release()
        agent_cfg = cfg.rl_agent()
        rows = [{"prompt": agent_cfg.fmt.build_messages(p.problem, hint=agent_cfg.tool_hint),
                 "problem": p.problem, "reference": p.reference} for p in problems]
        problem_of = {prompt_key(row["prompt"]): {"problem": p.problem, "reference": p.reference,
                                                  "problem_id": p.id}
                      for row, p in zip(rows, problems, strict=True)}
        gcfg = replace(rl.grpo, model=init, output_dir=str(out), seed=cfg.seed, rm_path=rm,
                       resume_from_checkpoint="latest" if any(out.glob("checkpoint-*"))
                       else None)
        rollout = agent_rollout(agent_cfg, s.pool(), problem_of, backend_factory=rl_backend,
                                runner_cfg=RunnerConfig(max_concurrency=cfg.concurrency))
        scorer = None
        if rm is not None:
            from tirforge.training.rm import RewardScorer

            scorer = RewardScorer(rm, style=cfg.rm.train.style,
                                  max_length=cfg.rm.train.max_length)
        s.log(f"rl: GRPO from {init} on {len(problems)} problems, RM {rm or 'none'} -> {dest}")
        trainer = grpo.make_trainer(gcfg, rollout, rows, scorer=scorer)
        trainer.train(resume_from_checkpoint=gcfg.resume_arg())
        trainer.save_model(str(out))
        trainer.processing_class.save_pretrained(str(out))
        trainer.state.save_to_json(str(out / "trainer_state.json"))  # the reward curve
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
        if cfg.save_dtype:
            from tirforge.agent.pipelines.loop_train import finalize

            finalize(init, out, dest, lora=False, dtype=cfg.save_dtype)
            shutil.copy(out / "trainer_state.json", dest / "trainer_state.json")
            shutil.rmtree(out, ignore_errors=True)
    state = dest / "trainer_state.json"
    history = json.loads(state.read_text()).get("log_history", []) if state.exists() else []
    curve = reward_curve(history)
    return finish_stage(rd, "train", {
        "skipped": False, "model": "rl/model", "init": model_label, "problems": len(problems),
        "rm": rm and rm_label(cfg, rm), "alpha": rl.grpo.rm_alpha if rm else None,
        "steps": len(curve), "rewards": curve, "reused": reused,
        "seconds": round(time.perf_counter() - t0, 1)})


def rl_model(cfg: Any) -> str | None:
    """The RL stage's model label (``rl/model``, or model_R when RL was skipped); None before
    its train stage finished."""
    meta = read_marker(cfg.run_dir / "rl", "train")
    return None if meta is None else meta["model"]
