"""The self-improvement loop (``tirforge loop``): rounds of rejection-sampling
self-improvement (RFT / expert iteration).

Round r (0 .. R) starts from model_r (model_0 = the configured base model):

1. **eval**: greedy TIR (temperature 0, one sample) on a held-out split, accuracy with a
   bootstrap 95 % CI. Round 0 evaluates the base model, so the table reads before / after.
2. **evolve** (optional): model_r rewrites some training problems into new ones, labelled by
   consensus of sampled TIR solutions; accepted ones join this round's collection.
3. **collect**: K sampled trajectories per training problem (``pipelines.collect``),
   graded by the agent against the reference.
4. **select**: distinct correct paths (``select_distinct``), optionally only those an outcome
   reward model scores above a threshold; written to ``round-<r>/train.jsonl``.
5. **train**: SFT (full or LoRA, merged) from model_r on that file into ``round-<r>/model``,
   which is model_{r+1}. A round that selects nothing skips SFT: model_{r+1} = model_r.

The config is ``loop_config.LoopConfig``; SFT and the model folders are ``loop_train``; the
markers and reports ``loop_report``. The last round (r = R) only evaluates. Everything lives
under ``<out_dir>/<name>/``:
``round-<r>/{eval,collect,evolve}/`` (resumable stores), ``train.jsonl``, ``model/``, one
``<stage>.done`` marker per finished stage holding that stage's metrics, and at the top
``config.yaml``, ``metrics.jsonl`` (one row per round), ``summary.md`` and ``progress.png``.

Resuming: a stage with a marker is skipped; an unfinished collection continues from its store;
a model folder that holds a complete save (config, weights, tokenizer) is reused; an
interrupted SFT resumes from its latest checkpoint. The markers are the source of truth for
the reports, which are rewritten from them at the end of every stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from tirforge.agent.pipelines.loop_config import LoopConfig, check_run_config, write_atomic
from tirforge.agent.pipelines.loop_report import (
    bootstrap_ci,
    finish_stage,
    histogram,
    read_marker,
    trajectory_stats,
    write_reports,
)
from tirforge.agent.pipelines.loop_train import stage_train
from tirforge.trajectories.datasets import Problem, load_dataset
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, config_hash

BackendFactory = Callable[[str], Any]
"""Model folder / alias / hub id -> a backend (``agent.backends``): tests inject a replay one."""
Progress = Callable[[str, int, int, int], None]
"""(what, trajectories done, to do, correct so far), after every trajectory of a collection."""


def log_tenths(log: Callable[[str], None]) -> Progress:
    """Progress as a log line per tenth of each collection (for log files: nohup, CI)."""
    t0: dict[str, float] = {}

    def progress(what: str, done: int, todo: int, correct: int) -> None:
        start = t0.setdefault(what, time.perf_counter())
        if done % max(1, todo // 10) == 0 or done == todo:
            log(f"{what}: {done}/{todo} trajectories, {correct} correct "
                f"({time.perf_counter() - start:.0f} s)")

    return progress


# --------------------------------------------------------------------------- data


def normalize_text(text: str) -> str:
    """Problem text for overlap checks: case and whitespace do not make a new problem."""
    return re.sub(r"\s+", " ", text).strip().lower()


def split_problems(
    dataset: str, start: int, limit: int | None, *, shuffle: bool, seed: int,
    allow_network: bool = False,
) -> list[Problem]:
    """Rows [start, start + limit) of ``dataset`` after dropping repeated problem texts (MAWPS
    repeats 87) and a seeded shuffle, so two ranges of one dataset never share a problem."""
    seen: set[str] = set()
    problems = []
    for p in load_dataset(dataset, allow_network=allow_network):
        key = normalize_text(p.problem)
        if key not in seen:
            seen.add(key)
            problems.append(p)
    if shuffle:
        random.Random(seed).shuffle(problems)
    end = None if limit is None else start + limit
    return problems[start:end]


def check_disjoint(train: Sequence[Problem], held_out: Sequence[Problem]) -> None:
    """Raise if a held-out problem is also a training problem, by id or by text."""
    ids = {p.id for p in train} & {p.id for p in held_out}
    texts = {normalize_text(p.problem) for p in train}
    same_text = [p.id for p in held_out if normalize_text(p.problem) in texts]
    if ids or same_text:
        shown = sorted(ids | set(same_text))[:5]
        raise ValueError(
            f"eval and train overlap: {len(ids)} shared ids, {len(same_text)} shared problem "
            f"texts (e.g. {shown}); pick disjoint slices or datasets")


def load_splits(cfg: LoopConfig) -> tuple[list[Problem], list[Problem]]:
    """The training and held-out problems, checked disjoint and labelled."""
    train = split_problems(cfg.train_dataset, cfg.train_start, cfg.train_limit,
                           shuffle=cfg.shuffle, seed=cfg.seed,
                           allow_network=cfg.allow_network)
    held = split_problems(cfg.eval_dataset, cfg.eval_start, cfg.eval_limit,
                          shuffle=cfg.shuffle, seed=cfg.seed,
                          allow_network=cfg.allow_network)
    if not train or not held:
        raise ValueError(f"empty split: {len(train)} train, {len(held)} eval problems")
    unlabelled = [p.id for p in [*train, *held] if p.reference is None]
    if unlabelled:
        raise ValueError(f"problems without a reference cannot be graded: {unlabelled[:5]}")
    check_disjoint(train, held)
    return train, held


def _write_problems(problems: Sequence[Problem], path: Path) -> None:
    write_atomic(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n"
                                for p in problems))


def _read_problems(path: Path) -> list[Problem]:
    return [Problem(**json.loads(ln)) for ln in path.read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------- the loop


class Session:
    """What the stages share: the problems, one kernel pool, the current model's backend."""

    def __init__(self, cfg: LoopConfig, factory: BackendFactory | None,
                 log: Callable[[str], None], progress: Progress | None = None):
        self.cfg, self.log = cfg, log
        self.progress = progress or log_tenths(log)
        self.factory = factory or self._default_factory
        self.train, self.held_out = load_splits(cfg)
        self._pool: Any = None
        self._backend: Any = None
        self._backend_model: str | None = None

    def _default_factory(self, model: str) -> Any:
        from tirforge.agent.backends import make_backend

        engine = {"max_model_len": self.cfg.vllm_max_model_len,
                  "gpu_memory_utilization": self.cfg.vllm_gpu_memory_utilization}
        return make_backend(self.cfg.backend, model, allow_network=self.cfg.allow_network,
                            max_concurrency=self.cfg.concurrency, log=self.log,
                            engine_kwargs=engine if self.cfg.backend == "vllm" else None)

    def pool(self) -> Any:
        """Started on first use: a run whose stages are all done starts no kernel."""
        if self._pool is None:
            from tirforge.executors import KernelPool

            self._pool = KernelPool(self.cfg.executor_config()).start()
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self._pool.install_signal_handlers()
        return self._pool

    def backend(self, model: str) -> Any:
        """The backend of ``model``, loaded once per round (and not at all for done rounds)."""
        if self._backend_model != model:
            self.release()
            self.log(f"loading {model} ({self.cfg.backend})")
            self._backend = self.factory(model)
            self._backend_model = model
        return self._backend

    def release(self) -> None:
        """Drop the model before SFT: the trainer needs the memory (on a GPU, all of it)."""
        b, self._backend, self._backend_model = self._backend, None, None
        if b is None:
            return
        with contextlib.suppress(Exception):
            if hasattr(b, "close"):  # vLLM: stops the engine core process and its workers
                b.close()
        del b
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def close(self) -> None:
        self.release()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _collect(
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


def stage_eval(s: Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """Greedy accuracy of model_r on the held-out split, with a bootstrap CI."""
    cfg, t0 = s.cfg, time.perf_counter()
    rep, cfg_hash, trajs = _collect(s, f"round {r} eval", s.held_out, 1, rd / "eval",
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


def stage_evolve(s: Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """New problems from a window of training seeds, labelled by consensus of model_r."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.pipelines.evolve import run_evolve, sampled_generate

    cfg, t0, folder = s.cfg, time.perf_counter(), rd / "evolve"
    generated = folder / "generated.jsonl"
    earlier = None
    if generated.exists():  # generation samples: redoing it would change the problems
        earlier = (_read_problems(generated),
                   json.loads((folder / "generated.json").read_text()))
    n = min(cfg.evolve_seeds, len(s.train))
    start = (r * n) % len(s.train)  # a different window of seeds each round
    seeds = (s.train[start:] + s.train[:start])[:n]
    sampling = cfg.agent.sampling
    params = SamplingParams(max_new_tokens=cfg.evolve_max_new_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p,
                            seed=cfg.seed + r)
    # A rewrite that reproduces a held-out problem would leak it into training.
    taken = {normalize_text(p.problem) for p in [*s.train, *s.held_out]}

    def keep(made: list[Problem]) -> list[Problem]:
        return [dataclasses.replace(p, id=f"evolved-r{r}/{p.id}") for p in made
                if normalize_text(p.problem) not in taken]

    def save(new: list[Problem], stats: dict) -> None:
        write_atomic(folder / "generated.json", json.dumps(stats))
        _write_problems(new, generated)

    def rewrite(prompts: list[str]) -> list[str]:
        return sampled_generate(s.backend(model), params)(prompts)

    def collect(new: list[Problem], samples: int) -> list[Trajectory]:
        return _collect(s, f"round {r} evolve-label", new, samples, folder / "label",
                        model_label, model, cfg.agent, "evolve-label")[2]

    labelled, stats = run_evolve(
        seeds, rewrite, collect, label_samples=cfg.evolve_label_samples,
        types=cfg.evolve_types, per_type=cfg.evolve_per_type, threshold=cfg.evolve_threshold,
        batch_size=cfg.concurrency, keep=keep, generated=earlier, on_generated=save)
    _write_problems([p for p in labelled if p.reference is not None], folder / "evolved.jsonl")
    return finish_stage(rd, "evolve", {**stats, "seconds": round(time.perf_counter() - t0, 1)})


def stage_collect(s: Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """K sampled, graded trajectories per training (and accepted evolved) problem."""
    from tirforge.agent.pipelines.collect import summarize

    cfg, t0 = s.cfg, time.perf_counter()
    evolved = rd / "evolve" / "evolved.jsonl"
    problems = [*s.train, *(_read_problems(evolved) if evolved.exists() else [])]
    k = cfg.samples_per_problem
    rep, cfg_hash, trajs = _collect(s, f"round {r} collect", problems, k, rd / "collect",
                                    model_label, model, cfg.agent, "collect")
    summary = summarize(trajs, problems)  # over the store, not only this run's new jobs
    correct = Counter(t.problem_id for t in trajs if t.verdict == "correct")
    return finish_stage(rd, "collect", {
        "model": model_label, "config_hash": cfg_hash, "problems": len(problems),
        "evolved_problems": len(problems) - len(s.train), "trajectories": len(trajs),
        "failed": rep.failed if rep else 0, "correct": sum(correct.values()),
        "pass@1": summary.pass_at_1, f"pass@{k}": summary.pass_at_k, f"maj@{k}": summary.maj_at_k,
        "correct_per_problem": histogram([correct[p.id] for p in problems]),
        **trajectory_stats(trajs), "seconds": round(time.perf_counter() - t0, 1),
    })


def stage_select(s: Session, r: int, rd: Path) -> dict:
    """Distinct correct paths (optionally RM-filtered) into ``train.jsonl``."""
    from tirforge.trajectories.select import SelectConfig, select_distinct

    cfg, t0 = s.cfg, time.perf_counter()
    trajs: list[Trajectory] = []
    for q in (range(r + 1) if cfg.accumulate else [r]):
        q_dir = cfg.run_dir / f"round-{q}"
        meta = read_marker(q_dir, "collect")
        if meta is None:  # rounds run in order, so only a hand-deleted marker gets here
            raise RuntimeError(f"{q_dir}: collection has not finished")
        trajs += [t for t in Store(q_dir / "collect") if t.config_hash == meta["config_hash"]]
    rm: dict[str, Any] = {}
    if cfg.rm_filter:
        from tirforge.training.rm import RewardScorer

        good = [t for t in trajs if t.verdict == "correct"]
        if good:
            s.log(f"scoring {len(good)} correct trajectories with {cfg.rm_filter}")
            scorer = RewardScorer(cfg.rm_filter)
            for t, score in zip(good, scorer.score(good), strict=True):
                t.score = score
            del scorer
            gc.collect()
            scores = [t.score for t in good if t.score is not None]
            rm = {"rm_mean": sum(scores) / len(scores), "rm_min": min(scores),
                  "rm_max": max(scores)}
    kept, rep = select_distinct(trajs, SelectConfig(
        max_per_problem=cfg.max_per_problem, dedup=cfg.dedup,
        min_score=cfg.rm_threshold if cfg.rm_filter else None))
    write_atomic(rd / "train.jsonl", "".join(t.model_dump_json() + "\n" for t in kept))
    distinct = rep.correct - rep.below_score - rep.duplicates
    per_problem = Counter(t.problem_id or t.problem for t in kept)
    pids = {t.problem_id or t.problem for t in trajs}
    return finish_stage(rd, "select", {
        **asdict(rep), "distinct": distinct, **rm,
        # correct trajectories -> distinct paths: low means the model repeats itself
        "dedup_ratio": distinct / rep.correct if rep.correct else None,
        "kept_per_problem": histogram([per_problem[p] for p in pids]),
        "seconds": round(time.perf_counter() - t0, 1),
    })


def model_of_round(cfg: LoopConfig, r: int) -> str:
    """The label of model_r: the base model's name, or ``round-<q>/model`` of the last round
    that trained (a skipped round hands its input model on)."""
    if r == 0:
        return cfg.model
    done = read_marker(cfg.run_dir / f"round-{r - 1}", "train")
    if done is None:
        raise RuntimeError(f"round {r - 1} has not finished training; cannot start round {r}")
    return done["model"]


def model_path(cfg: LoopConfig, label: str, *, resolve: bool = False,
               log: Callable[[str], None] = print) -> str:
    """What loads ``label``: a round's folder, or the base model (an alias for backends, which
    resolve it themselves; a folder for the trainer with ``resolve``)."""
    if label != cfg.model:
        return str((cfg.run_dir / label).resolve())
    if not resolve:
        return cfg.model
    from tirforge.agent.models import resolve_model

    path = resolve_model(cfg.model, allow_network=cfg.allow_network, log=log)
    if not Path(path).is_dir():  # a hub id: a local snapshot, since SFT children run offline
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    return path


def _round_stages(s: Session, r: int) -> list[tuple[str, Callable[[], dict]]]:
    """The stages of round r, in order, each a thunk that runs it and returns its metrics."""
    cfg = s.cfg
    rd = cfg.run_dir / f"round-{r}"
    label = model_of_round(cfg, r)
    model = model_path(cfg, label)
    stages: list[tuple[str, Callable[[], dict]]] = [
        ("eval", partial(stage_eval, s, r, rd, label, model))]
    if r == cfg.rounds:
        return stages  # the last model is evaluated, not trained further
    if cfg.evolve:
        stages.append(("evolve", partial(stage_evolve, s, r, rd, label, model)))

    def train() -> dict:
        init = label if cfg.sft_init == "current" else cfg.model
        return stage_train(s, r, rd, label, model_path(cfg, init, resolve=True, log=s.log))

    return stages + [("collect", partial(stage_collect, s, r, rd, label, model)),
                     ("select", partial(stage_select, s, r, rd)), ("train", train)]


def run_loop(cfg: LoopConfig, backend_factory: BackendFactory | None = None, *,
             log: Callable[[str], None] = print, progress: Progress | None = None) -> list[dict]:
    """Run (or resume) every round; return the metrics rows (also in ``metrics.jsonl``).

    ``backend_factory(model) -> backend`` replaces ``agent.backends.make_backend`` (tests pass a
    replay backend); it is called at most once per round with collection work left, with the
    base model's name or a round's model folder.
    """
    cfg.validate()
    if not cfg.allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = Session(cfg, backend_factory, log, progress)  # loads and checks the splits first
    check_run_config(cfg)
    log(f"{cfg.run_dir}: {len(s.train)} train problems ({cfg.train_dataset}), "
        f"{len(s.held_out)} eval problems ({cfg.eval_dataset}), {cfg.rounds} rounds")
    try:
        for r in range(cfg.rounds + 1):
            for stage, run in _round_stages(s, r):
                if read_marker(cfg.run_dir / f"round-{r}", stage) is not None:
                    log(f"round {r} {stage}: done, skipped")
                    continue
                log(f"round {r} {stage}")
                metrics = run()
                log(f"round {r} {stage}: {_brief(stage, metrics)}")
                write_reports(cfg)
    finally:
        s.close()
    return write_reports(cfg)


def _brief(stage: str, m: dict) -> str:
    if stage == "eval":
        return f"accuracy {m['accuracy']:.1%} [{m['ci_low']:.1%}, {m['ci_high']:.1%}]"
    if stage == "collect":
        return f"{m['trajectories']} trajectories, {m['correct']} correct"
    if stage == "select":
        return f"{m['correct']} correct -> {m['distinct']} distinct -> {m['kept']} kept"
    if stage == "train":
        return m.get("reason") or f"{m['examples']} examples -> {m['model']}"
    return f"{m.get('new', 0)} new problems, {m.get('accepted', 0)} accepted"
