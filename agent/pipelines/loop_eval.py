"""The loop's evaluation stages and its resumable collections: greedy accuracy with a
bootstrap CI (``eval``), and RM-guided inference (``sample``: N sampled trajectories per
held-out problem, maj@N, pass@N and, with a reward model, RM@N and RM-weighted majority)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_report import bootstrap_ci, finish_stage, trajectory_stats
from tirforge.trajectories.datasets import Problem
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, config_hash

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop import Session


def where(r: int | str) -> str:
    """How logs name a round (``round 2``) or the RL stage (``rl``)."""
    return f"round {r}" if isinstance(r, int) else str(r)


def collect_into(
    s: Session, what: str, problems: Sequence[Problem], samples: int, store_dir: Path,
    model_label: str, model: str, agent_cfg: Any, stage: str,
) -> tuple[Any, str, list[Trajectory]]:
    """Resumable collection with up to two retries of failed jobs (a transient server or
    kernel fault); jobs failing a third time are reported and counted as failures."""
    from tirforge.agent.pipelines.collect import run_collect

    cfg_hash = config_hash({"model": model_label, "agent": asdict(agent_cfg), "stage": stage})
    store = Store(store_dir)
    wanted = {p.id for p in problems}
    todo = len(problems) * samples - len(
        {k for k in store.done_keys() if k[2] == cfg_hash and k[0] in wanted and k[1] < samples})
    rep = None
    counts = {"done": 0, "correct": 0}

    def on_done(t: Trajectory | None) -> None:
        counts["done"] += 1
        counts["correct"] += t is not None and t.verdict == "correct"
        s.progress(what, counts["done"], todo, counts["correct"])

    with store:
        for attempt in range(3):
            backend = s.backend(model) if todo else None  # nothing to do: no model load
            rep = run_collect(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                              backend=backend, pool=s.pool() if todo else None,
                              agent_cfg=agent_cfg, concurrency=s.cfg.concurrency,
                              model_name=model_label, on_done=on_done)
            if not rep.failed:
                break
            s.log(f"{what}: {rep.failed} jobs failed ({rep.errors[0]})"
                  + ("; retrying" if attempt < 2 else "; giving up on them"))
    trajs = [t for t in Store(store_dir) if t.config_hash == cfg_hash
             and t.problem_id in wanted and (t.sample or 0) < samples]
    return rep, cfg_hash, trajs


def stage_eval(s: Session, r: int | str, rd: Path, model_label: str, model: str) -> dict:
    """Greedy accuracy of model_r (``r``: a round, or ``"rl"``) on the held-out split, with
    a bootstrap CI."""
    cfg, t0 = s.cfg, time.perf_counter()
    rep, cfg_hash, trajs = collect_into(s, f"{where(r)} eval", s.held_out, 1, rd / "eval",
                                    model_label, model, cfg.eval_agent(), "eval")
    by_pid = {t.problem_id: t for t in trajs}
    # A job that failed three times counts as wrong: the denominator is the whole split.
    scores = [float(p.id in by_pid and by_pid[p.id].verdict == "correct") for p in s.held_out]
    acc, low, high = bootstrap_ci(scores, samples=cfg.bootstrap_samples, level=cfg.ci_level,
                                  seed=cfg.seed)
    return finish_stage(rd, "eval", {
        "model": model_label, "config_hash": cfg_hash, "problems": len(s.held_out),
        "correct": int(sum(scores)), "accuracy": acc, "ci_low": low, "ci_high": high,
        "ci_level": cfg.ci_level, "failed": len(s.held_out) - len(by_pid),
        **trajectory_stats(trajs), "seconds": round(time.perf_counter() - t0, 1),
    })




def sample_groups(s: Session, rd: Path) -> list[list[Trajectory]]:
    """The ``sample`` stage's trajectories, one list per held-out problem (in sample order);
    problems with fewer than N finished samples (jobs that failed three times) are left out."""
    from tirforge.agent.pipelines.loop_report import read_marker

    meta = read_marker(rd, "sample")
    if meta is None:
        raise RuntimeError(f"{rd}: the sample stage has not finished")
    n = s.cfg.infer.n
    return _groups(s, [t for t in Store(rd / "sample") if t.config_hash == meta["config_hash"]
                       and (t.sample or 0) < n], n)


def rm_at_n(groups: Sequence[Sequence[Trajectory]], scores: Sequence[Sequence[float]],
            n: int) -> dict[str, float]:
    """{"rm@N", "rm_maj@N"} in [0, 1]: the RM's pick of each problem's N samples (and the
    RM-weighted vote), ``scores`` aligned with ``groups``."""
    from tirforge.trajectories.metrics import ProblemSamples, score_table

    if not groups:
        return {}
    table = score_table([ProblemSamples([t.final_answer for t in ts],
                                        [t.verdict == "correct" for t in ts], list(sc))
                         for ts, sc in zip(groups, scores, strict=True)], n)
    return {f"rm@{n}": table[f"rm@{n}"] / 100, f"rm_maj@{n}": table[f"rm_maj@{n}"] / 100}


def stage_sample(s: Session, r: int | str, rd: Path, model_label: str, model: str,
                 rm: str | None) -> dict:
    """N sampled trajectories per held-out problem with model_r: maj@N, pass@N, mean accuracy;
    with ``rm`` (a reward-model folder) also RM@N. Rounds that train their own RM add RM@N with
    it in the ``rm`` stage; the last round and the RL model are scored here with the last RM."""
    from tirforge.trajectories.metrics import ProblemSamples, score_table

    cfg, t0, n = s.cfg, time.perf_counter(), s.cfg.infer.n
    rep, cfg_hash, trajs = collect_into(s, f"{where(r)} sample", s.held_out, n, rd / "sample",
                                        model_label, model, cfg.sample_agent(), "sample")
    finish = {"model": model_label, "config_hash": cfg_hash, "n": n,
              "problems": len(s.held_out)}
    groups = _groups(s, trajs, n)
    metrics: dict[str, Any] = {**finish, "problems_scored": len(groups)}
    if groups:
        table = score_table([ProblemSamples([t.final_answer for t in ts],
                                            [t.verdict == "correct" for t in ts])
                             for ts in groups], n)
        metrics |= {"mean": table["mean"] / 100, f"maj@{n}": table[f"maj@{n}"] / 100,
                    f"pass@{n}": table[f"pass@{n}"] / 100}
    if rm is not None and groups:
        from tirforge.training.rm import RewardScorer

        s.release()  # one model in memory at a time
        sec = cfg.rm.train
        scorer = RewardScorer(rm, style=sec.style, max_length=sec.max_length)
        scores = [scorer.score(list(ts)) for ts in groups]
        metrics |= {"rm": rm_label(cfg, rm), **rm_at_n(groups, scores, n)}
    return finish_stage(rd, "sample", {**metrics, **trajectory_stats(trajs),
                                       "seconds": round(time.perf_counter() - t0, 1)})


def _groups(s: Session, trajs: Sequence[Trajectory], n: int) -> list[list[Trajectory]]:
    by_pid: dict[str, list[Trajectory]] = {p.id: [] for p in s.held_out}
    for t in trajs:
        if t.problem_id in by_pid:
            by_pid[t.problem_id].append(t)
    return [sorted(ts, key=lambda t: t.sample) for ts in by_pid.values() if len(ts) == n]


def rm_label(cfg: Any, path: str) -> str:
    """A reward-model folder as the reports name it: relative to the run when inside it."""
    try:
        return str(Path(path).resolve().relative_to(cfg.run_dir.resolve()))
    except ValueError:
        return path
