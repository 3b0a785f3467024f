"""``tirforge loop``: rounds of rejection-sampling self-improvement (RFT / expert iteration).

Round r (0 .. R) starts from model_r (model_0 = the configured base model):

1. **eval**: greedy TIR (temperature 0, one sample) on a held-out split, accuracy with a
   bootstrap 95 % CI. Round 0 evaluates the base model, so the table reads before / after.
2. **evolve** (optional): model_r rewrites some training problems into new ones, labelled by
   consensus of sampled TIR solutions; accepted ones join this round's collection.
3. **collect**: K sampled trajectories per training problem (``apps.data.run_collect``),
   graded by the agent against the reference.
4. **select**: distinct correct paths (``select_distinct``), optionally only those an outcome
   reward model scores above a threshold; written to ``round-<r>/train.jsonl``.
5. **train**: SFT (full or LoRA, merged) from model_r on that file into ``round-<r>/model``,
   which is model_{r+1}. A round that selects nothing skips SFT: model_{r+1} = model_r.

The last round (r = R) only evaluates. Everything lives under ``<out_dir>/<name>/``:
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
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tirforge.apps.loop_report import (
    bootstrap_ci,
    histogram,
    plot_progress,
    render_summary,
    trajectory_stats,
)
from tirforge.trajectories.datasets import Problem, load_dataset
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, config_hash

console = Console()

BackendFactory = Callable[[str], Any]
"""Model folder / alias / hub id -> a backend (``agent.backends``): tests inject a replay one."""


# --------------------------------------------------------------------------- config


@dataclass
class LoopConfig:
    """One self-improvement run (``configs/loop-*.yaml``); every field has a default."""

    name: str = "default"
    """Run name: everything goes to ``<out_dir>/<name>``."""
    out_dir: str = "runs/loop"
    """Parent folder of runs."""
    model: str = "smollm2"
    """Base model (round 0): alias, local folder, or hub id (with ``allow_network``)."""
    backend: str = "transformers"
    """Collection / eval backend: ``transformers`` (CPU or GPU) or ``vllm`` (in-process, GPU).
    Each round loads the newly trained folder, so a fixed ``openai`` server cannot be used."""
    vllm_max_model_len: int | None = None
    """vLLM context length (None: the model's own, e.g. 4096 for Qwen2.5-Math)."""
    vllm_gpu_memory_utilization: float = 0.85
    """Share of GPU memory the vLLM engine takes."""
    format: str = "qwen-tir"
    """Prompt format: qwen-tir, qwen-cot or dotamath."""
    allow_network: bool = False
    """Allow hub downloads of ``model`` (else HF_HUB_OFFLINE=1)."""

    train_dataset: str = "mawps"
    """Training problems: a registered dataset (``trajectories.datasets``) or a file."""
    train_start: int = 0
    """First row of the training slice (after de-duplication and shuffling)."""
    train_limit: int | None = 48
    """Training problems (None: to the end of the dataset)."""
    eval_dataset: str = "mawps"
    """Held-out problems; must share no id and no problem text with the training slice."""
    eval_start: int = 1000
    """First row of the eval slice (same dataset as training: pick a disjoint range)."""
    eval_limit: int | None = 100
    """Eval problems (None: to the end)."""
    shuffle: bool = True
    """Shuffle each dataset with ``seed`` before slicing (sources are often sorted by type)."""

    rounds: int = 2
    """Training rounds R: rounds 0 .. R-1 collect and train, round R only evaluates (R+1 evals).
    Raising it on an existing run continues the run."""
    samples_per_problem: int = 4
    """K: sampled trajectories per training problem and round."""
    temperature: float = 0.7
    """Sampling temperature of the collection (eval is always greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of the collection."""
    max_new_tokens: int = 384
    """Tokens per model turn."""
    max_turns: int = 4
    """Model turns per trajectory."""
    cell_timeout: float = 10.0
    """Seconds a code cell may run."""
    concurrency: int = 8
    """Trajectories in flight (kernels, model batch size)."""
    executor: str = "local"
    """Kernel backend: local or docker."""
    sandbox: str = "auto"
    """Local isolation: auto, bwrap or none."""

    max_per_problem: int | None = 4
    """Distinct correct paths kept per problem (None: all)."""
    dedup: bool = True
    """RFT distinct-path de-duplication (off: every correct trajectory, up to the cap)."""
    accumulate: bool = False
    """Select from the collections of every round so far, not only this round's."""
    rm_filter: str | None = None
    """Outcome reward model folder (``tirforge train rm``): keep only correct trajectories it
    scores at least ``rm_threshold`` (None: no filter)."""
    rm_threshold: float = 0.0
    """Score floor for ``rm_filter``."""

    evolve: bool = False
    """Also rewrite training problems into new ones each round (MuggleMath / DotaMath types),
    labelled by TIR consensus; accepted ones join that round's collection."""
    evolve_seeds: int = 8
    """Seed problems per round (a different window of the training slice each round)."""
    evolve_types: list[str] | None = None
    """Evolution types (None: all in ``trajectories/prompts/evolve``)."""
    evolve_per_type: int = 1
    """New problems per seed and type."""
    evolve_label_samples: int = 4
    """TIR samples voting on a new problem's answer."""
    evolve_threshold: float = 0.5
    """Agreement needed to accept a consensus answer."""
    evolve_max_new_tokens: int = 384
    """Tokens for one rewrite."""

    sft_init: str = "current"
    """``current``: train model_r into model_{r+1} (iterated RFT); ``base``: train the base
    model each round (expert iteration; pair with ``accumulate``)."""
    sft_epochs: float = 2.0
    """Passes over the round's selected data."""
    sft_lr: float = 1e-5
    """Peak learning rate."""
    sft_lora: bool = False
    """Train a LoRA adapter and merge it (the next round loads a plain model folder)."""
    sft_max_length: int = 1024
    """Tokens per training example."""
    sft_batch_size: int = 2
    """Examples per device per step."""
    sft_grad_accum: int = 4
    """Forward passes per optimiser step."""
    sft_extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``SFTTrainConfig`` field (warmup_steps, bf16, gradient_checkpointing, lora_r,
    report_to, ...)."""
    save_dtype: str | None = None
    """Cast each trained model to this dtype (``bfloat16``) before saving it: the trainer keeps
    float32 weights, which would make vLLM serve the next round in float32 (None: keep)."""
    sft_subprocess: bool = False
    """Run SFT in a child process (``tirforge train sft``): frees every byte of GPU memory the
    collection engine held. Always on with ``sft_accelerate_config``."""
    sft_accelerate_config: str | None = None
    """``accelerate launch --config_file`` for multi-GPU SFT (configs/accelerate/*.yaml)."""

    eval_max_new_tokens: int | None = None
    """Tokens per turn in eval (None: ``max_new_tokens``)."""
    eval_max_turns: int | None = None
    """Turns in eval (None: ``max_turns``)."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples for the accuracy CI."""
    ci_level: float = 0.95
    """Confidence level of the CI."""
    seed: int = 0
    """Dataset shuffling, bootstrap and SFT seed."""

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> LoopConfig:
        """Fields from a YAML mapping, then ``overrides`` (None ignored); unknown fields raise."""
        from tirforge.training.config import TrainConfig

        # The trainer configs' loader only needs dataclass fields: one set of YAML rules.
        cfg = TrainConfig.from_yaml.__func__(cls, path, **overrides)  # type: ignore[attr-defined]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject settings the loop cannot run with (before any work starts)."""
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if self.samples_per_problem < 1:
            raise ValueError("samples_per_problem must be >= 1")
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"backend must be transformers or vllm, not {self.backend!r}")
        if self.sft_init not in ("current", "base"):
            raise ValueError(f"sft_init must be current or base, not {self.sft_init!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '.', '_', '-' only")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# Fields that may change between runs of one run dir: they do not change what a stage produces.
RESUMABLE_FIELDS = frozenset({
    "rounds", "concurrency", "executor", "sandbox", "allow_network", "sft_subprocess",
    "sft_accelerate_config", "out_dir",
})


def check_run_config(cfg: LoopConfig) -> None:
    """Save the config on the first run; later runs must match it (bar ``RESUMABLE_FIELDS``),
    since finished stages are reused and would silently mix two configs."""
    import yaml

    path = cfg.run_dir / "config.yaml"
    current = asdict(cfg)
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
        diff = sorted(k for k in set(saved) | set(current)
                      if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
        if diff:
            raise ValueError(
                f"{cfg.run_dir} was started with a different config ({', '.join(diff)} differ); "
                "use another name or restore the settings in its config.yaml")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, yaml.safe_dump(current, sort_keys=False))


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
                           shuffle=cfg.shuffle, seed=cfg.seed, allow_network=cfg.allow_network)
    held = split_problems(cfg.eval_dataset, cfg.eval_start, cfg.eval_limit,
                          shuffle=cfg.shuffle, seed=cfg.seed, allow_network=cfg.allow_network)
    if not train or not held:
        raise ValueError(f"empty split: {len(train)} train, {len(held)} eval problems")
    unlabelled = [p.id for p in [*train, *held] if p.reference is None]
    if unlabelled:
        raise ValueError(f"problems without a reference cannot be graded: {unlabelled[:5]}")
    check_disjoint(train, held)
    return train, held


def _write_problems(problems: Sequence[Problem], path: Path) -> None:
    _write_atomic(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n"
                                for p in problems))


def _read_problems(path: Path) -> list[Problem]:
    return [Problem(**json.loads(ln)) for ln in path.read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _marker(rd: Path, stage: str) -> Path:
    return rd / f"{stage}.done"


def read_marker(rd: Path, stage: str) -> dict | None:
    """A finished stage's metrics, or None while it has not finished."""
    path = _marker(rd, stage)
    return json.loads(path.read_text()) if path.exists() else None


def _finish(rd: Path, stage: str, metrics: dict) -> dict:
    _write_atomic(_marker(rd, stage), json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def complete_model(folder: Path) -> bool:
    """A finished save: config, weights and tokenizer (written last by ``train_and_save``)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists() \
        and any((folder / w).exists() for w in weights)


# --------------------------------------------------------------------------- the loop


class _Session:
    """What the stages share: the problems, one kernel pool, the current model's backend."""

    def __init__(self, cfg: LoopConfig, factory: BackendFactory | None,
                 log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
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
            from tirforge.executors import ExecutorConfig, KernelPool

            exec_cfg = ExecutorConfig(backend=self.cfg.executor, sandbox=self.cfg.sandbox,
                                      timeout=self.cfg.cell_timeout,
                                      pool_size=max(1, self.cfg.concurrency))
            self._pool = KernelPool(exec_cfg).start()
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


def _agent_cfg(cfg: LoopConfig, *, greedy: bool) -> Any:
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig

    if greedy:
        sampling = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                  temperature=0.0)
        turns = cfg.eval_max_turns or cfg.max_turns
    else:
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p)
        turns = cfg.max_turns
    return AgentConfig(format=cfg.format, max_turns=turns, cell_timeout=cfg.cell_timeout,
                       sampling=sampling)


def _collect(
    s: _Session, what: str, problems: Sequence[Problem], samples: int, store_dir: Path,
    model_label: str, model: str, agent_cfg: Any, stage: str,
) -> tuple[Any, str, list[Trajectory]]:
    """Resumable collection with up to two retries of failed jobs (a transient server or
    kernel fault); jobs failing a third time are reported and counted as failures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tirforge.apps.data import run_collect

    cfg_hash = config_hash({"model": model_label, "agent": asdict(agent_cfg), "stage": stage})
    store = Store(store_dir)
    wanted = {p.id for p in problems}
    todo = len(problems) * samples - len(
        {k for k in store.done_keys() if k[2] == cfg_hash and k[0] in wanted and k[1] < samples})
    rep = None
    with store, Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("correct {task.fields[correct]}"), console=console,
                         transient=True) as progress:
        task = progress.add_task(what, total=todo, correct=0)
        n_done, n_correct, t0 = [0], [0], time.perf_counter()
        every = max(1, todo // 10)

        def on_done(t: Trajectory | None) -> None:
            n_done[0] += 1
            n_correct[0] += t is not None and t.verdict == "correct"
            progress.update(task, advance=1, correct=n_correct[0])
            # A log file (nohup, CI) shows no live bar: a line per tenth of the work instead.
            if not console.is_terminal and (n_done[0] % every == 0 or n_done[0] == todo):
                s.log(f"{what}: {n_done[0]}/{todo} trajectories, {n_correct[0]} correct "
                      f"({time.perf_counter() - t0:.0f} s)")

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


def stage_eval(s: _Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """Greedy accuracy of model_r on the held-out split, with a bootstrap CI."""
    cfg, t0 = s.cfg, time.perf_counter()
    rep, cfg_hash, trajs = _collect(s, f"round {r} eval", s.held_out, 1, rd / "eval",
                                    model_label, model, _agent_cfg(cfg, greedy=True), "eval")
    by_pid = {t.problem_id: t for t in trajs}
    # A job that failed three times counts as wrong: the denominator is the whole split.
    scores = [float(p.id in by_pid and by_pid[p.id].verdict == "correct") for p in s.held_out]
    acc, low, high = bootstrap_ci(scores, samples=cfg.bootstrap_samples, level=cfg.ci_level,
                                  seed=cfg.seed)
    return _finish(rd, "eval", {
        "model": model_label, "config_hash": cfg_hash, "problems": len(s.held_out),
        "correct": int(sum(scores)), "accuracy": acc, "ci_low": low, "ci_high": high,
        "ci_level": cfg.ci_level, "failed": len(s.held_out) - len(by_pid),
        **trajectory_stats(trajs), "seconds": round(time.perf_counter() - t0, 1),
    })


def stage_evolve(s: _Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """New problems from a window of training seeds, labelled by consensus of model_r."""
    from tirforge.agent.backends.base import Request, SamplingParams
    from tirforge.trajectories.evolve import EVOLVE_TYPES, EvolveConfig, evolve, label

    cfg, t0, folder = s.cfg, time.perf_counter(), rd / "evolve"
    generated = folder / "generated.jsonl"
    stats: dict[str, Any] = {}
    if generated.exists():  # generation samples: redoing it would change the problems
        new = _read_problems(generated)
        stats = json.loads((folder / "generated.json").read_text())
    else:
        n = min(cfg.evolve_seeds, len(s.train))
        start = (r * n) % len(s.train)  # a different window of seeds each round
        seeds = (s.train[start:] + s.train[:start])[:n]
        backend = s.backend(model)
        params = SamplingParams(max_new_tokens=cfg.evolve_max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + r)

        def generate(prompts: list[str]) -> list[str]:
            reqs = [Request(messages=[{"role": "user", "content": p}]) for p in prompts]
            return [c.text for c in backend.generate(reqs, params)]

        made, erep = evolve(seeds, generate, EvolveConfig(
            types=cfg.evolve_types or EVOLVE_TYPES, per_type=cfg.evolve_per_type,
            batch_size=max(1, cfg.concurrency)))
        # A rewrite that reproduces a held-out problem would leak it into training.
        taken = {normalize_text(p.problem) for p in [*s.train, *s.held_out]}
        new = [dataclasses.replace(p, id=f"evolved-r{r}/{p.id}") for p in made
               if normalize_text(p.problem) not in taken]
        stats = {**asdict(erep), "seeds": len(seeds), "dropped_overlap": len(made) - len(new)}
        _write_atomic(folder / "generated.json", json.dumps(stats))
        _write_problems(new, generated)
    accepted: list[Problem] = []
    if new:
        _, _, trajs = _collect(s, f"round {r} evolve-label", new, cfg.evolve_label_samples,
                               folder / "label", model_label, model,
                               _agent_cfg(cfg, greedy=False), "evolve-label")
        answers: dict[str, list[str | None]] = {p.id: [] for p in new}
        for t in trajs:
            answers[t.problem_id or ""].append(t.final_answer)
        labelled = [label(p, answers[p.id], threshold=cfg.evolve_threshold)[0] for p in new]
        accepted = [p for p in labelled if p.reference is not None]
    _write_problems(accepted, folder / "evolved.jsonl")
    return _finish(rd, "evolve", {**stats, "new": len(new), "accepted": len(accepted),
                                  "seconds": round(time.perf_counter() - t0, 1)})


def stage_collect(s: _Session, r: int, rd: Path, model_label: str, model: str) -> dict:
    """K sampled, graded trajectories per training (and accepted evolved) problem."""
    from tirforge.apps.data import summarize

    cfg, t0 = s.cfg, time.perf_counter()
    evolved = rd / "evolve" / "evolved.jsonl"
    problems = [*s.train, *(_read_problems(evolved) if evolved.exists() else [])]
    k = cfg.samples_per_problem
    rep, cfg_hash, trajs = _collect(s, f"round {r} collect", problems, k, rd / "collect",
                                    model_label, model, _agent_cfg(cfg, greedy=False), "collect")
    summary = summarize(trajs, problems)  # over the store, not only this run's new jobs
    correct = Counter(t.problem_id for t in trajs if t.verdict == "correct")
    return _finish(rd, "collect", {
        "model": model_label, "config_hash": cfg_hash, "problems": len(problems),
        "evolved_problems": len(problems) - len(s.train), "trajectories": len(trajs),
        "failed": rep.failed if rep else 0, "correct": sum(correct.values()),
        "pass@1": summary.pass_at_1, f"pass@{k}": summary.pass_at_k, f"maj@{k}": summary.maj_at_k,
        "correct_per_problem": histogram([correct[p.id] for p in problems]),
        **trajectory_stats(trajs), "seconds": round(time.perf_counter() - t0, 1),
    })


def stage_select(s: _Session, r: int, rd: Path) -> dict:
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
    _write_atomic(rd / "train.jsonl", "".join(t.model_dump_json() + "\n" for t in kept))
    distinct = rep.correct - rep.below_score - rep.duplicates
    per_problem = Counter(t.problem_id or t.problem for t in kept)
    pids = {t.problem_id or t.problem for t in trajs}
    return _finish(rd, "select", {
        **asdict(rep), "distinct": distinct, **rm,
        # correct trajectories -> distinct paths: low means the model repeats itself
        "dedup_ratio": distinct / rep.correct if rep.correct else None,
        "kept_per_problem": histogram([per_problem[p] for p in pids]),
        "seconds": round(time.perf_counter() - t0, 1),
    })


def _sft_config(cfg: LoopConfig, r: int, rd: Path, init: str, out: Path) -> Any:
    from tirforge.training.sft import SFTTrainConfig

    fields: dict[str, Any] = {
        "model": init, "train_file": str(rd / "train.jsonl"), "output_dir": str(out),
        "only_correct": True, "max_length": cfg.sft_max_length, "learning_rate": cfg.sft_lr,
        "num_train_epochs": cfg.sft_epochs, "per_device_train_batch_size": cfg.sft_batch_size,
        "gradient_accumulation_steps": cfg.sft_grad_accum, "lora": cfg.sft_lora,
        "seed": cfg.seed + r, "logging_steps": 5, "save_total_limit": 1,
        **cfg.sft_extra,
    }
    if any(out.glob("checkpoint-*")):  # an interrupted SFT continues where it stopped
        fields["resume_from_checkpoint"] = "latest"
    return SFTTrainConfig.from_yaml(None, **fields)  # rejects unknown sft_extra keys


def _run_sft(cfg: LoopConfig, sft_cfg: Any, rd: Path) -> None:
    if not (cfg.sft_subprocess or cfg.sft_accelerate_config):
        from tirforge.training.sft import train

        train(sft_cfg)
        return
    import yaml

    path = rd / "sft.yaml"
    _write_atomic(path, yaml.safe_dump(asdict(sft_cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "tirforge.apps.cli", "train", "sft", "-c", str(path)]
    if cfg.sft_accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               cfg.sft_accelerate_config, "-m", *cmd[2:]]
    console.log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def _finalize(init: str, trained: Path, dest: Path, *, lora: bool, dtype: str | None) -> None:
    """Write the next round's plain model folder from an SFT output: merge a LoRA adapter into
    ``init`` and/or cast the weights (the trainer saves float32), atomically (tmp + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(init if lora else str(trained),
                                                 dtype=torch.float32)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained)).merge_and_unload()
    if dtype:
        model = model.to(getattr(torch, dtype))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(trained)).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier save, if any
    os.replace(tmp, dest)


def stage_train(s: _Session, r: int, rd: Path, model_label: str, init: str) -> dict:
    """SFT of ``init`` (model_r, or the base model) on the round's data into
    ``round-<r>/model``; with nothing selected, record the skip and keep model_r."""
    cfg, t0 = s.cfg, time.perf_counter()
    examples = (read_marker(rd, "select") or {}).get("kept", 0)
    if not examples:
        return _finish(rd, "train", {
            "skipped": True, "model": model_label, "examples": 0,
            "reason": "no correct distinct trajectory selected: SFT skipped, model unchanged"})
    dest = rd / "model"
    reused = complete_model(dest)
    if not reused:
        s.release()
        # LoRA or a dtype cast: train elsewhere, then write the plain folder in one step.
        post = cfg.sft_lora or cfg.save_dtype is not None
        out = (rd / "adapter" if cfg.sft_lora else rd / "sft") if post else dest
        s.log(f"round {r}: SFT of {init} on {examples} examples -> {dest}")
        if not (post and (complete_adapter(out) or complete_model(out))):
            _run_sft(cfg, _sft_config(cfg, r, rd, init, out), rd)
        for ckpt in out.glob("checkpoint-*"):  # only needed to resume; ~3x the model each
            shutil.rmtree(ckpt, ignore_errors=True)
        if post:
            _finalize(init, out, dest, lora=cfg.sft_lora, dtype=cfg.save_dtype)
            if not cfg.sft_lora:
                shutil.rmtree(out, ignore_errors=True)  # a float32 duplicate of the model
    return _finish(rd, "train", {
        "skipped": False, "model": f"round-{r}/model", "examples": examples,
        "init": cfg.sft_init, "lora": cfg.sft_lora, "epochs": cfg.sft_epochs, "reused": reused,
        "seconds": round(time.perf_counter() - t0, 1)})


def complete_adapter(folder: Path) -> bool:
    """A finished LoRA save (adapter weights + tokenizer)."""
    return (folder / "adapter_config.json").exists() and (
        folder / "tokenizer_config.json").exists()


def model_of_round(cfg: LoopConfig, r: int) -> str:
    """The label of model_r: the base model's name, or ``round-<q>/model`` of the last round
    that trained (a skipped round hands its input model on)."""
    if r == 0:
        return cfg.model
    done = read_marker(cfg.run_dir / f"round-{r - 1}", "train")
    if done is None:
        raise RuntimeError(f"round {r - 1} has not finished training; cannot start round {r}")
    return done["model"]


def model_path(cfg: LoopConfig, label: str, *, resolve: bool = False) -> str:
    """What loads ``label``: a round's folder, or the base model (an alias for backends, which
    resolve it themselves; a folder for the trainer with ``resolve``)."""
    if label != cfg.model:
        return str((cfg.run_dir / label).resolve())
    if not resolve:
        return cfg.model
    from tirforge.agent.models import resolve_model

    path = resolve_model(cfg.model, allow_network=cfg.allow_network, log=console.log)
    if not Path(path).is_dir():  # a hub id: a local snapshot, since SFT children run offline
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    return path


def _round_stages(s: _Session, r: int) -> list[tuple[str, Callable[[], dict]]]:
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
        return stage_train(s, r, rd, label, model_path(cfg, init, resolve=True))

    return stages + [("collect", partial(stage_collect, s, r, rd, label, model)),
                     ("select", partial(stage_select, s, r, rd)), ("train", train)]


def run_loop(cfg: LoopConfig, backend_factory: BackendFactory | None = None, *,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or resume) every round; return the metrics rows (also in ``metrics.jsonl``).

    ``backend_factory(model) -> backend`` replaces ``agent.backends.make_backend`` (tests pass a
    replay backend); it is called at most once per round with collection work left, with the
    base model's name or a round's model folder.
    """
    log = log or console.log
    cfg.validate()
    if not cfg.allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = _Session(cfg, backend_factory, log)  # loads and checks the splits first
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


# --------------------------------------------------------------------------- reports


STAGES = ("eval", "evolve", "collect", "select", "train")


def collect_rows(cfg: LoopConfig) -> list[dict]:
    """One row per round that has finished at least one stage, from the markers."""
    rows = []
    for r in range(cfg.rounds + 1):
        rd = cfg.run_dir / f"round-{r}"
        row: dict[str, Any] = {"round": r}
        row.update({stage: m for stage in STAGES if (m := read_marker(rd, stage)) is not None})
        if len(row) > 1:
            rows.append(row)
    return rows


def write_reports(cfg: LoopConfig) -> list[dict]:
    """Rewrite ``metrics.jsonl``, ``summary.md`` and ``progress.png`` from the markers."""
    rows = collect_rows(cfg)
    _write_atomic(cfg.run_dir / "metrics.jsonl",
                  "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    _write_atomic(cfg.run_dir / "summary.md", render_summary(cfg, rows))
    plot_progress(rows, cfg.run_dir / "progress.png")
    return rows


# --------------------------------------------------------------------------- command


def loop_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="configs/loop-*.yaml")],
    name: Annotated[str | None, typer.Option(help="Run name (folder under out_dir).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Training rounds R (R+1 evals).")] = None,
    out_dir: Annotated[str | None, typer.Option(help="Parent folder of runs.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Trajectories in flight.")] = None,
) -> None:
    """Self-improvement: per round eval → collect K → select distinct correct → SFT, resumable."""
    try:
        cfg = LoopConfig.from_yaml(config, name=name, rounds=rounds, out_dir=out_dir,
                                   concurrency=concurrency)
        rows = run_loop(cfg)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    from rich.markdown import Markdown

    console.print(Markdown((cfg.run_dir / "summary.md").read_text()))
    console.print(f"{len(rows)} round rows in {cfg.run_dir / 'metrics.jsonl'}")


def register(app: typer.Typer) -> None:
    """Add ``tirforge loop`` to the top-level CLI."""
    app.command("loop")(loop_command)
