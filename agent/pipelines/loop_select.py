"""The loop's select stage: distinct correct paths (RFT) into ``round-<r>/train.jsonl``, chosen
with a reward model when there is one.

* ``rm.enabled`` (co-evolution): the round's own RM_r (its scores of this round's trajectories
  come from the ``rm`` stage's ``rm/scores.json``) orders each problem's correct paths; the
  score floor ``rm.select_min_score`` and the per-problem ``rm.select_top_k`` then decide what
  is kept. The marker records how this differs from RFT alone (``vs_rft``).
* ``rm_filter``: a fixed RM, kept paths score at least ``rm_threshold``.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_config import write_atomic
from tirforge.agent.pipelines.loop_report import finish_stage, histogram, read_marker
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop import Session


def round_trajectories(cfg: Any, r: int) -> list[Trajectory]:
    """The trajectories the select stage of round r draws from: this round's collection, or
    every round's so far with ``accumulate``."""
    trajs: list[Trajectory] = []
    for q in (range(r + 1) if cfg.accumulate else [r]):
        q_dir = cfg.run_dir / f"round-{q}"
        meta = read_marker(q_dir, "collect")
        if meta is None:  # rounds run in order, so only a hand-deleted marker gets here
            raise RuntimeError(f"{q_dir}: collection has not finished")
        trajs += [t for t in Store(q_dir / "collect") if t.config_hash == meta["config_hash"]]
    return trajs


def _score(s: Session, good: list[Trajectory], rm: str, known: dict[str, float]) -> None:
    """Set ``score`` on ``good``: from ``known`` (trajectory id -> score), the rest with ``rm``."""
    todo = [t for t in good if t.id not in known]
    if todo:
        from tirforge.training.rm import RewardScorer

        s.log(f"scoring {len(todo)} correct trajectories with {rm}")
        sec = s.cfg.rm.train
        scorer = RewardScorer(rm, style=sec.style, max_length=sec.max_length)
        known = {**known, **dict(zip((t.id for t in todo), scorer.score(todo), strict=True))}
        del scorer
        gc.collect()
    for t in good:
        t.score = known[t.id]


def round_rm(cfg: Any, r: int) -> str | None:
    """The RM folder round r's data is chosen with: RM_r (co-evolution; None when its stage
    was skipped with no earlier RM), else the fixed ``rm_filter``."""
    if not cfg.rm.enabled:
        return cfg.rm_filter
    meta = read_marker(cfg.run_dir / f"round-{r}", "rm") or {}
    return str(cfg.run_dir / meta["model"]) if meta.get("model") else None


def stage_select(s: Session, r: int, rd: Path) -> dict:
    """Distinct correct paths, RM-ordered and filtered when an RM is there, into
    ``train.jsonl``; the marker holds the selection report (and ``vs_rft``)."""
    from tirforge.trajectories.select import SelectConfig, select_distinct

    cfg, t0 = s.cfg, time.perf_counter()
    trajs = round_trajectories(cfg, r)
    rm = round_rm(cfg, r)
    coevolve = cfg.rm.enabled and cfg.rm.select and rm is not None
    extra: dict[str, Any] = {}
    select = SelectConfig(max_per_problem=cfg.max_per_problem, dedup=cfg.dedup)
    if rm is not None and (coevolve or not cfg.rm.enabled):
        good = [t for t in trajs if t.verdict == "correct"]
        scores_file = rd / "rm" / "scores.json"
        known = json.loads(scores_file.read_text()) if coevolve and scores_file.exists() else {}
        if good:
            _score(s, good, rm, known)
            vals = [t.score for t in good if t.score is not None]
            extra |= {"rm_mean": sum(vals) / len(vals), "rm_min": min(vals),
                      "rm_max": max(vals)}
        if coevolve:
            top_k = cfg.rm.select_top_k
            cap = top_k if cfg.max_per_problem is None else min(
                cfg.max_per_problem, top_k or cfg.max_per_problem)
            select = SelectConfig(max_per_problem=cap, dedup=cfg.dedup,
                                  min_score=cfg.rm.select_min_score)
            extra |= {"rm": str(Path(rm).relative_to(cfg.run_dir)), "top_k": cap,
                      "min_score": cfg.rm.select_min_score}
        else:
            select = SelectConfig(max_per_problem=cfg.max_per_problem, dedup=cfg.dedup,
                                  min_score=cfg.rm_threshold)
    kept, rep = select_distinct(trajs, select)
    if coevolve:
        rft, _ = select_distinct([t.model_copy(update={"score": None}) for t in trajs],
                                 SelectConfig(max_per_problem=cfg.max_per_problem,
                                              dedup=cfg.dedup))
        extra["vs_rft"] = compare_kept(kept, rft)
    write_atomic(rd / "train.jsonl", "".join(t.model_dump_json() + "\n" for t in kept))
    distinct = rep.correct - rep.below_score - rep.duplicates
    per_problem = Counter(t.problem_id or t.problem for t in kept)
    pids = {t.problem_id or t.problem for t in trajs}
    return finish_stage(rd, "select", {
        **asdict(rep), "distinct": distinct, **extra,
        # correct trajectories -> distinct paths: low means the model repeats itself
        "dedup_ratio": distinct / rep.correct if rep.correct else None,
        "kept_per_problem": histogram([per_problem[p] for p in pids]),
        "seconds": round(time.perf_counter() - t0, 1),
    })


def compare_kept(kept: list[Trajectory], rft: list[Trajectory]) -> dict[str, int]:
    """How RM-guided selection changed the kept set against RFT alone (same trajectories):
    sizes, trajectories in both, added / dropped by the RM, problems whose set changed."""
    a, b = {t.id for t in kept}, {t.id for t in rft}

    def by_problem(ts: list[Trajectory]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for t in ts:
            out.setdefault(t.problem_id or t.problem, set()).add(t.id)
        return out

    pa, pb = by_problem(kept), by_problem(rft)
    return {"rm_kept": len(a), "rft_kept": len(b), "both": len(a & b), "added": len(a - b),
            "dropped": len(b - a),
            "problems_changed": sum(pa.get(p, set()) != pb.get(p, set()) for p in pa | pb)}
