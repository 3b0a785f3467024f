"""Data pipeline commands: ``tirforge collect / evolve / select / export``.

Orchestration lives here (not in ``trajectories``) because it drives the agent: the batched
runner (``agent.runner``) solves the (problem, sample) jobs a resumable ``Store`` lacks, on
kernels from a ``KernelPool``, and each graded trajectory is appended as it lands.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tirforge.trajectories.datasets import FieldMap, Problem, load_dataset
from tirforge.trajectories.faults import fault_counts
from tirforge.trajectories.grading import answers_equal
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.select import consensus
from tirforge.trajectories.store import Store, StoreConfig, config_hash

console = Console()


# --------------------------------------------------------------------------- collection


@dataclass
class CollectReport:
    """Summary of the trajectories in a store for one config over a problem set."""

    problems: int = 0
    trajectories: int = 0
    new: int = 0
    """Solved in this run (the rest were already in the store)."""
    failed: int = 0
    """Jobs that raised in this run; not stored, so a re-run retries them."""
    pass_at_1: float = 0.0
    pass_at_k: float = 0.0
    maj_at_k: float = 0.0
    mean_turns: float = 0.0
    error_rate: float = 0.0
    """(failed jobs + trajectories that stopped on an error) / attempts."""
    kernel_restarts: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # cells per fault kind
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def summarize(trajs: Sequence[Trajectory], problems: Sequence[Problem]) -> CollectReport:
    rep = CollectReport(problems=len(problems), trajectories=len(trajs))
    by_pid: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_pid[t.problem_id or ""].append(t)
    labelled = [p for p in problems if p.reference is not None and by_pid.get(p.id)]
    if labelled:
        p1 = pk = mj = 0.0
        for p in labelled:
            group = by_pid[p.id]
            ok = [t.verdict == "correct" for t in group]
            p1 += sum(ok) / len(ok)
            pk += any(ok)
            vote = consensus([t.final_answer for t in group], threshold=0.0, min_votes=1)
            mj += vote.answer is not None and answers_equal(vote.answer, p.reference or "")
        rep.pass_at_1, rep.pass_at_k, rep.maj_at_k = (
            x / len(labelled) for x in (p1, pk, mj)
        )
    rep.faults = fault_counts(trajs)
    if trajs:
        rep.mean_turns = sum(len(t.steps) for t in trajs) / len(trajs)
        rep.kernel_restarts = sum(
            1 for t in trajs for s in t.steps if s.execution is not None and s.execution.restarted
        )
    return rep


def job_seed(p: Problem, k: int) -> int:
    """A seed per (problem, sample): re-runs and resumes draw the same samples."""
    return zlib.crc32(f"{p.id}#{k}".encode())


def run_collect(
    problems: Sequence[Problem],
    *,
    samples: int,
    store: Store,
    cfg_hash: str,
    backend: Any,
    pool: Any,
    agent_cfg: Any,
    concurrency: int = 4,
    max_batch: int | None = None,
    model_name: str = "",
    on_done: Callable[[Trajectory | None], None] | None = None,
) -> CollectReport:
    """Solve every (problem, sample) not yet in ``store`` with the batched runner; each result
    is stored as it lands, and a job that raises is counted (and retried by the next run)."""
    from tirforge.agent.runner import RunnerConfig, run_many

    t0 = time.perf_counter()
    done = store.done_keys()
    jobs = [
        (p, k) for p in problems for k in range(samples) if (p.id, k, cfg_hash) not in done
    ]
    failed: list[str] = []
    new = 0

    def on_result(p: Problem, k: int, res: Trajectory | BaseException) -> None:
        nonlocal new
        traj = None
        if isinstance(res, BaseException):
            failed.append(f"{p.id}#{k}: {type(res).__name__}: {res}")
        else:
            traj = res
            traj.problem_id, traj.sample, traj.config_hash = p.id, k, cfg_hash
            store.add(traj)
            new += 1
        if on_done is not None:
            on_done(traj)

    if jobs:
        runner = RunnerConfig(max_concurrency=max(1, concurrency),
                              max_batch=max_batch or max(1, concurrency))
        run_many(problems, backend, pool, agent_cfg, runner, jobs=jobs, seed_of=job_seed,
                 on_result=on_result, model_name=model_name)
    wanted = {p.id for p in problems}
    trajs = [t for t in store if t.config_hash == cfg_hash and t.problem_id in wanted
             and (t.sample or 0) < samples]  # a larger earlier run must not skew pass@k
    rep = summarize(trajs, problems)
    rep.new, rep.failed, rep.errors = new, len(failed), failed
    attempts = len(trajs) + len(failed)
    stopped_on_error = sum(t.stop_reason == "error" for t in trajs)
    rep.error_rate = (len(failed) + stopped_on_error) / attempts if attempts else 0.0
    rep.seconds = time.perf_counter() - t0
    return rep


def print_report(rep: CollectReport, samples: int) -> None:
    table = Table(title="collection summary")  # one metric per row: fits narrow terminals
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in [
        ("problems", rep.problems), ("trajectories", rep.trajectories), ("new this run", rep.new),
        ("pass@1", f"{rep.pass_at_1:.1%}"), (f"pass@{samples}", f"{rep.pass_at_k:.1%}"),
        (f"maj@{samples}", f"{rep.maj_at_k:.1%}"), ("mean turns", f"{rep.mean_turns:.2f}"),
        ("error rate", f"{rep.error_rate:.1%}"), ("kernel restarts", rep.kernel_restarts),
        ("time", f"{rep.seconds:.1f}s"),
    ]:
        table.add_row(name, str(value))
    console.print(table)
    for err in rep.errors[:10]:
        console.print(f"[red]failed[/red] {err}")


def _make_backend(
    model: str, replay: Path | None, allow_network: bool, max_batch: int = 8, *,
    backend: str = "transformers", base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
) -> Any:
    """The backend every trajectory of a run shares (the runner batches its calls); a replay
    script is played afresh by each trajectory."""
    if replay is not None:
        from tirforge.agent.backends.replay import ReplayBackend

        turns = json.loads(replay.read_text())
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise typer.BadParameter(f"{replay}: expected a JSON list of assistant turns")
        return ReplayBackend(turns)
    from tirforge.agent.backends import make_backend

    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with console.status(f"Loading {model} ({backend}) ..."):
        return make_backend(backend, model, base_url=base_url, api_key_env=api_key_env,
                            allow_network=allow_network, max_concurrency=max_batch,
                            log=console.log)


def _field_map(problem_field, answer_field, answer_format) -> FieldMap | None:
    if problem_field is None and answer_field is None and answer_format is None:
        return None
    answer = "answer" if answer_field is None else (answer_field or None)
    return FieldMap(
        problem=tuple(problem_field.split("+")) if problem_field else "problem",
        answer=answer,
        answer_format=answer_format or "raw",
        answer_required=answer is not None,
    )


def _load(dataset: str, fields: FieldMap | None, limit: int | None) -> list[Problem]:
    """Load or exit with the loader's message (file:line for malformed rows), no traceback."""
    try:
        return load_dataset(dataset, fields, limit=limit)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


ProblemField = Annotated[
    str | None, typer.Option(help="Problem field of a file dataset ('a+b' joins two fields).")
]
AnswerField = Annotated[
    str | None, typer.Option(help="Answer field of a file dataset ('' = unlabelled).")
]
AnswerFormat = Annotated[
    str | None, typer.Option(help="raw, gsm8k (#### N), boxed (from a solution), list, ...")
]


def collect(
    dataset: Annotated[str, typer.Argument(help="Registered dataset name (gsm8k, math500, ...) "
                                           "or a JSONL / JSON / Parquet file or HF folder.")],
    out: Annotated[Path, typer.Option(help="Store folder (resumable).")] = Path("runs/collect"),
    samples: Annotated[int, typer.Option(help="Samples per problem (k).")] = 4,
    model: Annotated[str, typer.Option(help="Model alias, local folder or hub id.")] = "smollm2",
    backend: Annotated[str, typer.Option(help="transformers, openai (any OpenAI-compatible "
                                         "server) or vllm.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    format: Annotated[str, typer.Option(help="Prompt format: qwen-tir, qwen-cot, dotamath.")
                      ] = "qwen-tir",
    limit: Annotated[int | None, typer.Option(help="First N problems only.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per turn at most.")] = 512,
    concurrency: Annotated[int, typer.Option(help="Trajectories in flight (kernels).")] = 4,
    executor: Annotated[str, typer.Option(help="local or docker.")] = "local",
    sandbox: Annotated[str, typer.Option(help="Local isolation: auto, bwrap, none.")] = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    fsync: Annotated[bool, typer.Option(help="fsync every record (power-loss safe).")] = True,
    problem_field: ProblemField = None,
    answer_field: AnswerField = None,
    answer_format: AnswerFormat = None,
    replay: Annotated[Path | None, typer.Option(
        help="Testing: replay these assistant turns (JSON list) instead of a model.")] = None,
    allow_network: Annotated[bool, typer.Option(help="Allow hub downloads.")] = False,
) -> None:
    """Run the agent K times on every problem of DATASET into a resumable store."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.formats import FORMATS
    from tirforge.agent.graph import AgentConfig
    from tirforge.executors import ExecutorConfig, KernelPool

    if format not in FORMATS:
        raise typer.BadParameter(f"unknown format; one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    problems = _load(dataset, _field_map(problem_field, answer_field, answer_format), limit)
    agent_cfg = AgentConfig(
        format=format,
        max_turns=max_turns,
        cell_timeout=timeout,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
    )
    model_name = "replay" if replay else model
    cfg_hash = config_hash({"model": model_name, "agent": asdict(agent_cfg)})
    try:
        shared = _make_backend(model, replay, allow_network, max_batch=concurrency,
                               backend=backend, base_url=base_url)
    except (ValueError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None

    exec_cfg = ExecutorConfig(backend=executor, sandbox=sandbox, timeout=timeout,
                              pool_size=max(1, concurrency))
    store = Store(out, StoreConfig(fsync=fsync))
    total = len(problems) * samples
    console.log(f"{len(problems)} problems x {samples} samples -> {out} (config {cfg_hash})")
    with KernelPool(exec_cfg) as pool, store, Progress(
        TextColumn("[bold]collect"), BarColumn(), MofNCompleteColumn(),
        TextColumn("correct {task.fields[correct]}"), TextColumn("{task.fields[rate]} traj/s"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        pool.install_signal_handlers()
        already = len(store.done_keys() & {(p.id, k, cfg_hash) for p in problems
                                           for k in range(samples)})
        task = progress.add_task("collect", total=total, completed=already, correct=0, rate="-")
        t0, counts = time.perf_counter(), {"n": 0, "correct": 0}

        def on_done(traj: Trajectory | None) -> None:
            counts["n"] += 1
            counts["correct"] += traj is not None and traj.verdict == "correct"
            rate = counts["n"] / (time.perf_counter() - t0)
            progress.update(task, advance=1, correct=counts["correct"], rate=f"{rate:.2f}")

        rep = run_collect(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                          backend=shared, pool=pool, agent_cfg=agent_cfg,
                          concurrency=concurrency, model_name=model_name, on_done=on_done)
    print_report(rep, samples)
    if rep.failed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- selection / export


def _read_stores(stores: Sequence[Path]) -> list[Trajectory]:
    trajs: list[Trajectory] = []
    for s in stores:
        if not s.is_dir():
            raise typer.BadParameter(f"{s} is not a store folder")
        trajs.extend(Store(s))
    return trajs


def select(
    stores: Annotated[list[Path], typer.Argument(help="Store folders (runs/models to merge).")],
    out: Annotated[Path, typer.Option(help="SFT output: *.parquet or a dataset folder.")],
    max_per_problem: Annotated[int, typer.Option(help="Distinct paths kept per problem.")] = 4,
    min_score: Annotated[float | None, typer.Option(help="Reward-model score floor.")] = None,
    dedup: Annotated[bool, typer.Option(help="RFT distinct-path dedup.")] = True,
    dpo_out: Annotated[Path | None, typer.Option(help="Also write DPO pairs here.")] = None,
    max_pairs: Annotated[int, typer.Option(help="DPO pairs per problem at most.")] = 4,
) -> None:
    """Keep correct, distinct trajectories (RFT) as an SFT dataset; optionally DPO pairs."""
    from tirforge.trajectories.export import save, to_dpo_dataset, to_sft_dataset
    from tirforge.trajectories.select import SelectConfig, dpo_pairs, select_distinct

    trajs = _read_stores(stores)
    kept, rep = select_distinct(trajs, SelectConfig(max_per_problem, min_score, dedup))
    table = Table(title="selection")
    for name, value in asdict(rep).items():
        table.add_row(name.replace("_", " "), str(value))
    if kept:
        save(to_sft_dataset(kept), out)
        table.add_row("sft written to", str(out))
    if dpo_out is not None:
        pairs = dpo_pairs(trajs, max_pairs_per_problem=max_pairs)
        table.add_row("dpo pairs", str(len(pairs)))
        if pairs:
            save(to_dpo_dataset(pairs), dpo_out)
    console.print(table)
    if not kept:
        console.print("[red]no correct trajectory to select[/red]")
        raise typer.Exit(1)


def export(
    stores: Annotated[list[Path], typer.Argument(help="Store folders.")],
    out: Annotated[Path, typer.Option(help="*.parquet or a dataset folder.")],
    verdict: Annotated[str | None, typer.Option(help="Only this verdict (e.g. correct).")] = None,
) -> None:
    """Every stored trajectory (once) as a dataset with `messages` and `messages_fenced`."""
    from tirforge.trajectories.export import save, to_sft_dataset

    trajs = [t for t in _read_stores(stores) if verdict is None or t.verdict == verdict]
    save(to_sft_dataset(trajs), out)
    console.print(f"{len(trajs)} trajectories written to {out}")


# --------------------------------------------------------------------------- evolution


def run_evolve(
    seeds: Sequence[Problem],
    generate: Callable[[list[str]], list[str]],
    *,
    label_samples: int,
    store: Store,
    backend: Any,
    pool: Any,
    agent_cfg: Any,
    model_name: str = "",
    types: Sequence[str] | None = None,
    per_type: int = 1,
    threshold: float = 0.5,
    concurrency: int = 1,
) -> tuple[list[Problem], dict]:
    """Rewrite seeds, then label each new problem by consensus of ``label_samples`` TIR runs."""
    from tirforge.trajectories.evolve import EVOLVE_TYPES, EvolveConfig, evolve, label

    new, erep = evolve(seeds, generate, EvolveConfig(types=types or EVOLVE_TYPES,
                                                     per_type=per_type))
    # The texts are part of the key: a re-run that rewrote the seeds differently (sampling)
    # reuses the ids, and must not inherit labels of the old texts.
    cfg_hash = config_hash({"evolve-label": label_samples,
                            "problems": [(p.id, p.problem) for p in new]})
    labelled: list[Problem] = []
    if label_samples > 0 and new:
        run_collect(new, samples=label_samples, store=store, cfg_hash=cfg_hash,
                    backend=backend, pool=pool, agent_cfg=agent_cfg, concurrency=concurrency,
                    model_name=model_name)
        answers: dict[str, list[str | None]] = defaultdict(list)
        for t in store:
            if t.config_hash == cfg_hash:
                answers[t.problem_id or ""].append(t.final_answer)
        labelled = [label(p, answers[p.id], threshold=threshold)[0] for p in new]
    else:
        labelled = new
    stats = {**asdict(erep), "accepted": sum(p.reference is not None for p in labelled)}
    return labelled, stats


def evolve(
    dataset: Annotated[str, typer.Argument(help="Seed dataset (name or file).")],
    out: Annotated[Path, typer.Option(help="JSONL of new problems (+ provenance, consensus).")],
    limit: Annotated[int | None, typer.Option(help="First N seeds only.")] = 10,
    types: Annotated[str | None, typer.Option(help="Comma-separated evolution types.")] = None,
    per_type: Annotated[int, typer.Option(help="New problems per seed and type.")] = 1,
    label_samples: Annotated[int, typer.Option(help="TIR samples for consensus (0: none).")] = 4,
    threshold: Annotated[float, typer.Option(help="Agreement needed to accept a label.")] = 0.5,
    model: Annotated[str, typer.Option(help="Model that rewrites and solves.")] = "smollm2",
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    concurrency: Annotated[int, typer.Option(help="Labelling trajectories in flight.")] = 2,
    allow_network: Annotated[bool, typer.Option(help="Allow hub downloads.")] = False,
) -> None:
    """Rewrite seed problems (MuggleMath / DotaMath types) and label them by TIR consensus."""
    from tirforge.agent.backends.base import Request, SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.executors import ExecutorConfig, KernelPool

    seeds = _load(dataset, None, limit)
    backend = _make_backend(model, None, allow_network)
    params = SamplingParams(max_new_tokens=512, temperature=temperature)

    def generate(prompts: list[str]) -> list[str]:
        reqs = [Request(messages=[{"role": "user", "content": p}]) for p in prompts]
        return [c.text for c in backend.generate(reqs, params)]

    store = Store(out.with_suffix(".store"))
    with KernelPool(ExecutorConfig(pool_size=max(1, concurrency))) as pool, store:
        problems, stats = run_evolve(
            seeds, generate, label_samples=label_samples, store=store, backend=backend,
            pool=pool, agent_cfg=AgentConfig(sampling=params), model_name=model,
            types=types.split(",") if types else None, per_type=per_type,
            threshold=threshold, concurrency=concurrency,
        )
    write_problems(problems, out)
    console.print(f"{stats} -> {out}")


def write_problems(problems: Sequence[Problem], out: Path) -> None:
    """JSONL loadable with ``--problem-field problem --answer-field answer`` (or as a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for p in problems:
            row = {"id": p.id, "problem": p.problem, "answer": p.reference, **p.meta}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def register(app: typer.Typer) -> None:
    """Add the pipeline commands to the top-level CLI."""
    for fn in (collect, evolve, select, export):
        app.command()(fn)
