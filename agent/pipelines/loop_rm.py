"""The loop's ``rm`` stage: RM_r, a reward model trained on round r's graded samples, so that the
RM co-evolves with the policy (Qwen2.5-Math: massive sampling trains the RM, the RM picks the
SFT data, the stronger SFT model's samples train the next RM).

The round's training problems are split (seeded, by problem) into a held-in part the RM trains
on (``rm/train.jsonl``; listwise over each problem's samples or pairwise, ``rm.train``) and a
held-out part its AUC is measured on. RM_r warm-starts from RM_{r-1} or from the round's policy
(``rm.init``) and is saved to ``round-<r>/rm/model``. The stage then scores every trajectory of
the round (``rm/scores.json``, which the select stage reads) and, with ``infer.n``, the round's
N held-out samples: RM@N. A round whose held-in problems have no correct/incorrect pair trains
nothing and hands the previous RM on.

Resuming: a complete ``rm/model`` is reused; an interrupted training resumes from its latest
checkpoint; the split and train file are rewritten identically.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_config import write_atomic
from tirforge.agent.pipelines.loop_eval import rm_at_n, sample_groups
from tirforge.agent.pipelines.loop_report import finish_stage, read_marker
from tirforge.agent.pipelines.loop_select import round_trajectories
from tirforge.agent.pipelines.loop_train import complete_model
from tirforge.trajectories.schema import Trajectory

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop import Session


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """ROC AUC of ``scores`` for ``labels`` (Mann-Whitney U, ties count half); None without
    both a positive and a negative."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def split_by_problem(trajs: list[Trajectory], held_out: float, seed: int
                     ) -> tuple[list[Trajectory], list[Trajectory]]:
    """(held-in, held-out) trajectories: a seeded share ``held_out`` of the problems (at least
    one when there are two or more problems and the share is > 0) goes to the held-out side."""
    pids = sorted({t.problem_id or t.problem for t in trajs})
    random.Random(seed).shuffle(pids)
    n_out = min(len(pids) - 1, max(1, round(held_out * len(pids)))) if held_out > 0 else 0
    out = set(pids[:max(0, n_out)])
    return ([t for t in trajs if (t.problem_id or t.problem) not in out],
            [t for t in trajs if (t.problem_id or t.problem) in out])


def trainable(trajs: list[Trajectory]) -> int:
    """Problems with both a correct and an incorrect sample (what RM training learns from)."""
    kinds: dict[str, set[bool]] = {}
    for t in trajs:
        kinds.setdefault(t.problem_id or t.problem, set()).add(t.verdict == "correct")
    return sum(len(k) == 2 for k in kinds.values())


def previous_rm(cfg: Any, r: int) -> str | None:
    """The label (``round-<q>/rm/model``) of the newest RM trained before round r, or None."""
    for q in range(r - 1, -1, -1):
        meta = read_marker(cfg.run_dir / f"round-{q}", "rm")
        if meta and meta.get("model"):
            return meta["model"]
    return None


def final_rm(cfg: Any) -> str | None:
    """The RM of the last round's inference and of the RL stage: the newest co-evolved one
    (RM_{R-1}, or earlier when later rounds skipped), else ``rm_filter``."""
    if cfg.rm.enabled:
        label = previous_rm(cfg, cfg.rounds)
        return None if label is None else str((cfg.run_dir / label).resolve())
    return cfg.rm_filter


def stage_rm(s: Session, r: int, rd: Path, policy: str) -> dict:
    """Train RM_r (warm start from RM_{r-1} or ``policy``, the resolved model_r folder) on the
    held-in problems; record held-out AUC, RM@N and the scores of the round's trajectories."""
    from tirforge.training.rm import RewardScorer, train

    cfg, t0, sec = s.cfg, time.perf_counter(), s.cfg.rm
    folder, dest = rd / "rm", rd / "rm" / "model"
    trajs = [t for t in round_trajectories(cfg, r)
             if t.stop_reason != "error"]  # an infrastructure fault says nothing of the answer
    held_in, held_out = split_by_problem(trajs, sec.held_out, cfg.seed + r)
    write_atomic(folder / "train.jsonl", "".join(t.model_dump_json() + "\n" for t in held_in))
    prev = previous_rm(cfg, r)
    base = {"trajectories": len(held_in), "held_out_trajectories": len(held_out),
            "problems": trainable(held_in), "loss": sec.train.loss}
    if not base["problems"]:
        return finish_stage(rd, "rm", {
            **base, "skipped": True, "model": prev,
            "reason": "no held-in problem has both a correct and an incorrect sample: "
                      + ("the previous RM is kept" if prev else "no RM this round"),
            "seconds": round(time.perf_counter() - t0, 1)})
    init = str((cfg.run_dir / prev).resolve()) if sec.init == "previous" and prev else policy
    reused = complete_model(dest)
    if not reused:
        s.release()
        resume = "latest" if any(dest.glob("checkpoint-*")) else None
        s.log(f"round {r}: RM training from {init} on {base['problems']} problems -> {dest}")
        train(replace(sec.train, model=init, train_file=str(folder / "train.jsonl"),
                      output_dir=str(dest), seed=cfg.seed + r, resume_from_checkpoint=resume))
        for ckpt in dest.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    t_train = time.perf_counter() - t0
    scorer = RewardScorer(str(dest), style=sec.train.style, max_length=sec.train.max_length)
    scores = dict(zip((t.id for t in trajs), scorer.score(trajs), strict=True))
    write_atomic(folder / "scores.json", json.dumps(scores))

    def side_auc(side: list[Trajectory]) -> float | None:
        return auc([scores[t.id] for t in side], [t.verdict == "correct" for t in side])

    metrics: dict[str, Any] = {
        **base, "skipped": False, "model": f"round-{r}/rm/model",
        "init": "previous" if init != policy else "policy", "reused": reused,
        "auc_held_out": side_auc(held_out), "auc_held_in": side_auc(held_in),
        "train_seconds": round(t_train, 1)}
    if cfg.infer.n > 0 and read_marker(rd, "sample") is not None:
        groups = sample_groups(s, rd)
        metrics |= rm_at_n(groups, [scorer.score(list(ts)) for ts in groups], cfg.infer.n)
    return finish_stage(rd, "rm", {**metrics, "seconds": round(time.perf_counter() - t0, 1)})
