"""The self-improvement loop (``tirforge loop``): rounds of rejection-sampling
self-improvement (RFT / expert iteration).

Round r (0 .. R) starts from model_r (model_0 = the configured base model):

1. **eval**: greedy TIR (temperature 0, one sample) on a held-out split, accuracy with a
   bootstrap 95 % CI. Round 0 evaluates the base model, so the table reads before / after.
   With ``infer.n``, **sample** adds N sampled trajectories per held-out problem: maj@N, pass@N
   (``loop_eval``).
2. **evolve** (optional): model_r rewrites some training problems into new ones, labelled by
   consensus of sampled TIR solutions; accepted ones join this round's collection.
3. **collect**: K sampled trajectories per training problem (``pipelines.collect``),
   graded by the agent against the reference.
4. **rm** (``rm.enabled``): RM_r trained on the round's graded samples, warm-started from
   RM_{r-1} or model_r; held-out AUC and RM@N (``loop_rm``).
5. **select**: distinct correct paths (``select_distinct``), ordered and filtered by RM_r (or a
   fixed ``rm_filter``); written to ``round-<r>/train.jsonl`` (``loop_select``).
6. **train**: SFT (full or LoRA, merged) from model_r on that file into ``round-<r>/model``,
   which is model_{r+1}. A round that selects nothing skips SFT: model_{r+1} = model_r.

After the last round (``rl.enabled``), ``rl/`` holds the final RL stage: a difficulty filter,
GRPO from model_R with the last RM shaping the reward, and the RL model's evals (``loop_rl``).

The config is ``loop_config.LoopConfig``; SFT and the model folders are ``loop_train``; the
markers and reports ``loop_report``. The last round (r = R) only evaluates. Everything lives
under ``<out_dir>/<name>/``:
``round-<r>/{eval,sample,collect,evolve}/`` (resumable stores), ``rm/``, ``train.jsonl``,
``model/``, ``rl/``, one
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
from tirforge.agent.pipelines.loop_eval import collect_into, stage_eval, stage_sample
from tirforge.agent.pipelines.loop_report import (
    finish_stage,
    histogram,
    read_marker,
    trajectory_stats,
    write_reports,
)
from tirforge.agent.pipelines.loop_rl import rl_model, stage_filter, stage_rl_train
from tirforge.agent.pipelines.loop_rm import final_rm, stage_rm
from tirforge.agent.pipelines.loop_select import stage_select
from tirforge.agent.pipelines.loop_train import stage_train
from tirforge.trajectories.datasets import Problem, load_dataset
from tirforge.trajectories.schema import Trajectory

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
        return collect_into(s, f"round {r} evolve-label", new, samples, folder / "label",
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
    rep, cfg_hash, trajs = collect_into(s, f"round {r} collect", problems, k, rd / "collect",
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
    last = r == cfg.rounds
    if cfg.infer.n > 0:  # the last round has no RM of its own: the newest one scores it
        stages.append(("sample", partial(stage_sample, s, r, rd, label, model,
                                         final_rm(cfg) if last else None)))
    if last:
        return stages  # the last model is evaluated, not trained further
    if cfg.evolve:
        stages.append(("evolve", partial(stage_evolve, s, r, rd, label, model)))

    def resolved(init: str) -> str:
        return model_path(cfg, init, resolve=True, log=s.log)

    def train() -> dict:
        return stage_train(s, r, rd, label, resolved(label if cfg.sft_init == "current"
                                                      else cfg.model))

    stages.append(("collect", partial(stage_collect, s, r, rd, label, model)))
    if cfg.rm.enabled:
        stages.append(("rm", lambda: stage_rm(s, r, rd, resolved(label))))
    return stages + [("select", partial(stage_select, s, r, rd)), ("train", train)]


def _rl_stages(s: Session, rl_backend: Any) -> list[tuple[str, Callable[[], dict]]]:
    """The RL stage's steps (``rl/``): filter, GRPO, then the RL model's evals."""
    cfg, rd = s.cfg, s.cfg.run_dir / "rl"
    final = model_of_round(cfg, cfg.rounds)
    stages: list[tuple[str, Callable[[], dict]]] = [
        ("filter", partial(stage_filter, s, rd, final, model_path(cfg, final))),
        ("train", lambda: stage_rl_train(s, rd, final, model_path(
            cfg, final, resolve=True, log=s.log), rl_backend))]
    if (read_marker(rd, "train") or {}).get("skipped"):
        return stages  # no RL model: model_R was evaluated in round R
    label = rl_model(cfg) or "rl/model"  # known once train finished (before its evals run)
    evals: list[tuple[str, Callable[[], dict]]] = [("eval", lambda: stage_eval(
        s, "rl", rd, label, model_path(cfg, label)))]
    if cfg.infer.n > 0:
        evals.append(("sample", lambda: stage_sample(s, "rl", rd, label, model_path(cfg, label),
                                                    final_rm(cfg))))
    return stages + evals


def run_loop(cfg: LoopConfig, backend_factory: BackendFactory | None = None, *,
             log: Callable[[str], None] = print, progress: Progress | None = None,
             rl_backend: Callable[[Any, Any], Any] | None = None) -> list[dict]:
    """Run (or resume) every round, then the RL stage (``rl.enabled``); return the metrics rows
    (also in ``metrics.jsonl``).

    ``backend_factory(model) -> backend`` replaces ``agent.backends.make_backend`` (tests pass a
    replay backend); it is called at most once per round with collection work left, with the
    base model's name or a round's model folder. ``rl_backend(model, tokenizer) -> backend``
    replaces the GRPO rollouts' live-policy backend.
    """
    cfg.validate()
    if not cfg.allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = Session(cfg, backend_factory, log, progress)  # loads and checks the splits first
    check_run_config(cfg)
    log(f"{cfg.run_dir}: {len(s.train)} train problems ({cfg.train_dataset}), "
        f"{len(s.held_out)} eval problems ({cfg.eval_dataset}), {cfg.rounds} rounds"
        + (" + RL" if cfg.rl.enabled else ""))
    try:
        for r in range(cfg.rounds + 1):
            _run_stages(s, f"round {r}", cfg.run_dir / f"round-{r}", _round_stages(s, r))
        if cfg.rl.enabled:
            # Built in two passes: the evals need the label the train stage records.
            for part in (slice(0, 2), slice(2, None)):
                _run_stages(s, "rl", cfg.run_dir / "rl", _rl_stages(s, rl_backend)[part])
    finally:
        s.close()
    return write_reports(cfg)


def _run_stages(s: Session, what: str, rd: Path,
                stages: list[tuple[str, Callable[[], dict]]]) -> None:
    """Run the stages without a marker in ``rd``, rewriting the reports after each."""
    for stage, run in stages:
        if read_marker(rd, stage) is not None:
            s.log(f"{what} {stage}: done, skipped")
            continue
        s.log(f"{what} {stage}")
        metrics = run()
        s.log(f"{what} {stage}: {_brief(stage, metrics)}")
        write_reports(s.cfg)


def _brief(stage: str, m: dict) -> str:
    if stage == "eval":
        return f"accuracy {m['accuracy']:.1%} [{m['ci_low']:.1%}, {m['ci_high']:.1%}]"
    if stage == "collect":
        return f"{m['trajectories']} trajectories, {m['correct']} correct"
    if stage == "select":
        return f"{m['correct']} correct -> {m['distinct']} distinct -> {m['kept']} kept"
    if stage == "train":
        return m.get("reason") or (f"{m['examples']} examples -> {m['model']}" if "examples"
                                   in m else f"{m['steps']} GRPO log rows -> {m['model']}")
    if stage == "sample":
        return ", ".join(f"{k} {m[k]:.1%}" for k in m if "@" in k) or "no complete groups"
    if stage == "rm":
        return m.get("reason") or f"{m['model']}, held-out AUC {m['auc_held_out']}"
    if stage == "filter":
        return f"{m['kept']} of {m['problems']} problems in range {m['range']}"
    return f"{m.get('new', 0)} new problems, {m.get('accepted', 0)} accepted"
