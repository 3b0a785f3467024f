"""Data pipeline commands: ``tirforge collect / evolve / select / export``.

Faces only: they parse options, call ``agent.pipelines.collect`` / ``agent.pipelines.evolve``
and ``trajectories.select`` / ``export``, and render progress and summaries.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tirforge.agent.pipelines.collect import (
    CollectReport,
    field_map,
    make_run_backend,
    run_collect,
)
from tirforge.apps.choices import (
    BackendName,
    ExecutorOpt,
    FormatOpt,
    SandboxOpt,
    check_server,
    warn_unsandboxed,
)
from tirforge.apps.outputs import dataset_out, folder_out, jsonl_out
from tirforge.trajectories.datasets import FieldMap, Problem, load_dataset
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import LOCK_NAME, Store, StoreConfig, StoreLocked, config_hash

console = Console()


# --------------------------------------------------------------------------- collection


def print_report(rep: CollectReport, samples: int) -> None:
    """The collection summary as a table of one metric per row (+ one row per Ray actor)."""
    table = Table(title="collection summary")  # one metric per row: fits narrow terminals
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in [
        ("problems", rep.problems), ("trajectories", rep.trajectories), ("new this run", rep.new),
        ("pass@1", f"{rep.pass_at_1:.1%}"), (f"pass@{samples}", f"{rep.pass_at_k:.1%}"),
        (f"maj@{samples}", f"{rep.maj_at_k:.1%}"), ("mean turns", f"{rep.mean_turns:.2f}"),
        ("error rate", f"{rep.error_rate:.1%}"), ("kernel restarts", rep.kernel_restarts),
        ("faults (cells)", ", ".join(f"{k} {v}" for k, v in sorted(rep.faults.items())) or "-"),
        ("time", f"{rep.seconds:.1f}s"),
    ]:
        table.add_row(name, str(value))
    if rep.workers:
        table.add_row("retried (actor died)", str(len(rep.retried)))
    console.print(table)
    print_workers(rep)
    for err in rep.errors[:10]:
        console.print(f"[red]failed[/red] {err}")


def print_workers(rep: CollectReport) -> None:
    """Per-actor throughput and retries of a Ray collection (nothing for a local one)."""
    if not rep.workers:
        return
    table = Table(title="ray actors")
    for col in ("actor", "node", "pid", "width", "traj", "traj/min", "retried", "restarts",
                "state"):
        table.add_column(col, justify="left" if col in ("actor", "node", "state") else "right")
    for w in rep.workers:
        table.add_row(w.name, w.node, str(w.pid), str(w.concurrency), str(w.trajectories),
                      f"{w.per_minute:.1f}", str(w.retried), str(w.restarts),
                      "alive" if w.alive else "[red]gone[/red]")
    console.print(table)
    if rep.retried:
        shown = ", ".join(rep.retried[:10]) + (" ..." if len(rep.retried) > 10 else "")
        console.print(f"retried on another actor: {shown}")


@contextmanager
def collect_progress(total: int, already: int, label: str = "collect"
                     ) -> Iterator[Callable[[Trajectory | None], None]]:
    """One progress bar over every worker; yields the per-result callback. Without a terminal
    it logs a line at every 10% instead (CI logs, ``nohup``, a cluster job's output)."""
    t0, counts = time.perf_counter(), {"n": 0, "correct": 0, "logged": -1}

    def rate() -> float:
        return counts["n"] / max(1e-9, time.perf_counter() - t0)

    def count(traj: Trajectory | None) -> None:
        counts["n"] += 1
        counts["correct"] += traj is not None and traj.verdict == "correct"

    if not console.is_terminal:
        def on_line(traj: Trajectory | None) -> None:
            count(traj)
            done = already + counts["n"]
            tenth = 10 * done // max(1, total)
            if tenth > counts["logged"] or done == total:
                counts["logged"] = tenth
                console.log(f"{label}: {done}/{total} ({done / max(1, total):.0%}), "
                            f"correct {counts['correct']}, {rate():.2f} traj/s")

        yield on_line
        return
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("correct {task.fields[correct]}"), TextColumn("{task.fields[rate]} traj/s"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task(label, total=total, completed=already, correct=0, rate="-")

        def on_bar(traj: Trajectory | None) -> None:
            count(traj)
            progress.update(task, advance=1, correct=counts["correct"], rate=f"{rate():.2f}")

        yield on_bar


def _load(dataset: str, fields: FieldMap | None, limit: int | None,
          allow_network: bool = False) -> list[Problem]:
    """Load or exit with the loader's message (file:line for malformed rows), no traceback."""
    try:
        return load_dataset(dataset, fields, limit=limit, allow_network=allow_network)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
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
RayFlag = Annotated[bool, typer.Option(
    "--ray", help="Run on a Ray cluster: one actor per node, each with its own model backend "
                  "and kernel pool; this process writes the store.")]
RayAddress = Annotated[str | None, typer.Option(
    help="Ray cluster to join (host:port or ray://...); default: the local Ray instance "
         "(RAY_ADDRESS, a `ray start` cluster here, else a new one).")]
RayActors = Annotated[int | None, typer.Option(
    help="Ray actors in all (default: one per node).")]
RayGpus = Annotated[float, typer.Option(help="GPUs per Ray actor (its own vLLM engine).")]


def collect(
    dataset: Annotated[str, typer.Argument(help="Registered dataset name (gsm8k, math500, ...) "
                                           "or a JSONL / JSON / Parquet file or HF folder.")],
    out: Annotated[Path, typer.Option(help="Store folder (resumable; not a file).")] = Path(
        "runs/collect"),
    samples: Annotated[int, typer.Option(help="Samples per problem (k).")] = 4,
    model: Annotated[str, typer.Option(help="Model alias, local folder or hub id.")] = "smollm2",
    backend: Annotated[BackendName, typer.Option(help="Model backend: transformers, openai "
                                                 "(any OpenAI-compatible server) or vllm.")
                       ] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Variable holding the server's key.")] = (
        "OPENAI_API_KEY"
    ),
    format: FormatOpt = "qwen-tir",
    limit: Annotated[int | None, typer.Option(help="First N problems only.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per turn at most.")] = 512,
    concurrency: Annotated[int | None, typer.Option(
        help="Trajectories in flight (kernels); with --ray per actor, default: its node's "
             "CPUs. \\[default: 4]")] = None,
    executor: ExecutorOpt = "local",
    sandbox: SandboxOpt = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    fsync: Annotated[bool, typer.Option(help="fsync every record (power-loss safe).")] = True,
    problem_field: ProblemField = None,
    answer_field: AnswerField = None,
    answer_format: AnswerFormat = None,
    replay: Annotated[Path | None, typer.Option(
        help="Testing: replay these assistant turns (JSON list) instead of a model.")] = None,
    allow_network: Annotated[bool, typer.Option(
        help="Allow hub downloads (the model, and a named dataset with no local copy).")] = False,
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    ray_actors: RayActors = None,
    ray_gpus_per_actor: RayGpus = 0.0,
) -> None:
    """Run the agent K times on every problem of DATASET into a resumable store."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.models import ModelNotFoundError
    from tirforge.executors import ExecutorConfig

    folder_out(out)
    check_server(backend, base_url)
    problems = _load(dataset, field_map(problem_field, answer_field, answer_format), limit,
                     allow_network)
    agent_cfg = AgentConfig(
        format=format,
        max_turns=max_turns,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
    )
    model_name = "replay" if replay else model
    cfg_hash = config_hash({"model": model_name, "agent": asdict(agent_cfg)})
    fresh = not out.exists()
    store = Store(out, StoreConfig(fsync=fsync))
    try:
        store.acquire()  # before anything slow: a second writer is told at once who holds it
    except StoreLocked as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    width = 4 if concurrency is None else max(1, concurrency)
    exec_cfg = ExecutorConfig(backend=executor, sandbox=sandbox, timeout=timeout,
                              pool_size=max(1, width))
    warn_unsandboxed(sandbox, executor)
    # Cleanup runs inside `with store`, while the lock is still ours.
    with store, removed_if_unused(out, fresh):
        if ray:
            spec = backend_spec(model, backend, replay, base_url, api_key_env, allow_network)
            with ray_collector(spec, exec_cfg, ray_address, ray_actors, concurrency,
                               ray_gpus_per_actor, api_key_env) as rc:
                collect_fn = partial(rc.collect, model_name=model_name)
                rep = _collect(problems, samples, store, cfg_hash, agent_cfg, out, collect_fn)
        else:
            from tirforge.executors import KernelPool

            try:
                with console.status(f"Loading {model} ({backend}) ..."):
                    shared = make_run_backend(model, replay, allow_network=allow_network,
                                              max_batch=width, backend=backend,
                                              base_url=base_url, api_key_env=api_key_env,
                                              log=console.log)
            except (ValueError, ImportError, ModelNotFoundError) as e:
                console.print(f"[red]error:[/red] {escape(str(e))}")
                raise typer.Exit(2) from None
            with KernelPool(exec_cfg) as pool:
                pool.install_signal_handlers()
                collect_fn = partial(run_collect, backend=shared, pool=pool, concurrency=width,
                                     model_name=model_name)
                rep = _collect(problems, samples, store, cfg_hash, agent_cfg, out, collect_fn)
    print_report(rep, samples)
    if rep.failed:
        raise typer.Exit(1)


@contextmanager
def removed_if_unused(folder: Path, fresh: bool) -> Iterator[None]:
    """Remove the store folder this command made (``fresh``: it did not exist before) when the
    command fails before writing a record (a model that does not load, kernels that do not
    start): no half-made folder is left. Call it holding the store's lock; only a folder with
    nothing but the writer lock in it goes, so nothing collected is ever lost."""
    try:
        yield
    except BaseException:
        if fresh and folder.is_dir() and all(p.name == LOCK_NAME for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _collect(problems: list[Problem], samples: int, store: Store, cfg_hash: str, agent_cfg,
             out: Path, collect_fn: Callable[..., CollectReport]) -> CollectReport:
    """Run ``collect_fn`` (local ``run_collect`` or ``RayCollector.collect``) under one bar."""
    console.log(f"{len(problems)} problems x {samples} samples -> {out} (config {cfg_hash})")
    wanted = {(p.id, k, cfg_hash) for p in problems for k in range(samples)}
    already = len(store.done_keys() & wanted)
    with collect_progress(len(wanted), already) as on_done:
        return collect_fn(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                          agent_cfg=agent_cfg, on_done=on_done)


def backend_spec(model: str, backend: str, replay: Path | None, base_url: str | None,
                 api_key_env: str, allow_network: bool):
    """What every Ray actor builds its backend from (a replay file is sent as its turns)."""
    from tirforge.agent.pipelines.distributed import BackendSpec

    turns = None
    if replay is not None:
        turns = json.loads(replay.read_text())
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            console.print(f"[red]error:[/red] {replay}: expected a JSON list of assistant turns")
            raise typer.Exit(2)
    return BackendSpec(model=model, backend=backend, replay_turns=turns, base_url=base_url,
                       api_key_env=api_key_env, allow_network=allow_network)


@contextmanager
def ray_collector(spec, exec_cfg, address: str | None, actors: int | None,
                  concurrency: int | None, gpus: float, api_key_env: str) -> Iterator:
    """A started ``RayCollector`` or a clear exit (Ray missing, cluster unreachable)."""
    import os

    from tirforge.agent.pipelines.distributed import RayCollector, RayConfig

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", api_key_env) if k in os.environ}
    rc = None
    try:
        cfg = RayConfig(address=address, actors=actors, concurrency=concurrency,
                        gpus_per_actor=gpus, env=env)
        rc = RayCollector(spec, exec_cfg, cfg, log=console.log)
        with console.status("Starting Ray actors (each loads its model and kernels) ..."):
            rc.start()
    except (ImportError, ConnectionError, ValueError, RuntimeError) as e:
        if rc is not None:
            rc.close()
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    try:
        yield rc
    finally:
        rc.close()


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
    out: Annotated[Path, typer.Option(help="SFT output: *.jsonl, *.parquet or a dataset "
                                      "folder (a path with no suffix).")],
    max_per_problem: Annotated[int, typer.Option(help="Distinct paths kept per problem.")] = 4,
    min_score: Annotated[float | None, typer.Option(help="Reward-model score floor.")] = None,
    dedup: Annotated[bool, typer.Option(help="RFT distinct-path dedup.")] = True,
    dpo_out: Annotated[Path | None, typer.Option(
        help="Also write DPO pairs here (*.jsonl, *.parquet or a folder).")] = None,
    max_pairs: Annotated[int, typer.Option(help="DPO pairs per problem at most.")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
) -> None:
    """Keep correct, distinct trajectories (RFT) as an SFT dataset; optionally DPO pairs."""
    from tirforge.trajectories.export import save, to_dpo_dataset, to_sft_dataset
    from tirforge.trajectories.select import SelectConfig, dpo_pairs, select_distinct

    dataset_out(out, overwrite=overwrite)
    dataset_out(dpo_out, "--dpo-out", overwrite=overwrite)
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
    out: Annotated[Path, typer.Option(help="*.jsonl, *.parquet or a dataset folder (a path "
                                      "with no suffix).")],
    verdict: Annotated[str | None, typer.Option(help="Only this verdict (e.g. correct).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Every stored trajectory (once) as a dataset with `messages` and `messages_fenced`."""
    from tirforge.trajectories.export import save, to_sft_dataset

    dataset_out(out, overwrite=overwrite)
    trajs = [t for t in _read_stores(stores) if verdict is None or t.verdict == verdict]
    try:
        save(to_sft_dataset(trajs), out)
    except ValueError as e:  # nothing matched: say so, no traceback
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    console.print(f"{len(trajs)} trajectories written to {out}")


# --------------------------------------------------------------------------- evolution


def evolve(
    dataset: Annotated[str, typer.Argument(help="Seed dataset (name or file).")],
    out: Annotated[Path, typer.Option(help="JSONL of new problems (+ provenance, consensus); "
                                      "labelling trajectories go to OUT.store.")],
    limit: Annotated[int | None, typer.Option(help="First N seeds only.")] = 10,
    types: Annotated[str | None, typer.Option(help="Comma-separated evolution types.")] = None,
    per_type: Annotated[int, typer.Option(help="New problems per seed and type.")] = 1,
    label_samples: Annotated[int, typer.Option(help="TIR samples for consensus (0: none).")] = 4,
    threshold: Annotated[float, typer.Option(help="Agreement needed to accept a label.")] = 0.5,
    model: Annotated[str, typer.Option(help="Model that rewrites and solves.")] = "smollm2",
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    concurrency: Annotated[int, typer.Option(help="Labelling trajectories in flight.")] = 2,
    allow_network: Annotated[bool, typer.Option(
        help="Allow hub downloads (the model, and a named dataset with no local copy).")] = False,
) -> None:
    """Rewrite seed problems (MuggleMath / DotaMath types) and label them by TIR consensus."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.models import ModelNotFoundError
    from tirforge.agent.pipelines.evolve import run_evolve, sampled_generate, store_collector
    from tirforge.executors import ExecutorConfig, KernelPool

    jsonl_out(out)
    seeds = _load(dataset, None, limit, allow_network)
    try:
        with console.status(f"Loading {model} ..."):
            backend = make_run_backend(model, allow_network=allow_network, log=console.log)
    except (ValueError, ImportError, ModelNotFoundError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    params = SamplingParams(max_new_tokens=512, temperature=temperature)
    store = Store(out.with_suffix(".store"))
    with KernelPool(ExecutorConfig(pool_size=max(1, concurrency))) as pool, store:
        collect_labels = store_collector(store, backend, pool, AgentConfig(sampling=params),
                                         model_name=model, concurrency=concurrency)
        problems, stats = run_evolve(
            seeds, sampled_generate(backend, params), collect_labels,
            label_samples=label_samples, types=types.split(",") if types else None,
            per_type=per_type, threshold=threshold,
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
