"""``tirforge eval``: the Qwen2.5-Math evaluation protocol (``agent.pipelines.evaluate``) on the
shared benchmarks, rendered as a rich table, Markdown and JSON (one row per benchmark plus the
average).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tirforge.agent.pipelines.evaluate import EvalConfig, run_benchmark
from tirforge.apps.choices import (
    BackendName,
    ExecutorOpt,
    FormatOpt,
    SandboxOpt,
    check_server,
    warn_unsandboxed,
)
from tirforge.apps.data import (
    RayActors,
    RayAddress,
    RayFlag,
    RayGpus,
    backend_spec,
    ray_collector,
)
from tirforge.apps.outputs import folder_out
from tirforge.trajectories.store import StoreLocked

console = Console()


def render(rows: dict[str, dict[str, float]], cfg: EvalConfig) -> tuple[Table, str, dict]:
    """The result as a rich table, Markdown and JSON, with an average row."""
    search = f"search@{cfg.search_beam}x{max(2, cfg.n)}"
    cols = ["greedy"] + [c for c in (f"maj@{cfg.n}", f"rm@{cfg.n}", f"rm_maj@{cfg.n}",
                                     f"pass@{cfg.n}", search) if any(c in r for r in rows.values())]
    avg = {c: sum(r[c] for r in rows.values()) / len(rows) for c in cols if rows}
    title = f"{cfg.model} · {cfg.format} · n={cfg.n}"
    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    md = [f"**{title}**", "", "| benchmark | problems | " + " | ".join(cols) + " |",
          "|---|---:|" + "---:|" * len(cols)]
    for name, r in [*rows.items(), ("average", {**avg, "problems": float("nan")})]:
        n = "" if name == "average" else f"{int(r['problems'])}"
        cells = [f"{r[c]:.1f}" for c in cols]
        table.add_row(name, n, *cells, style="bold" if name == "average" else None)
        md.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    data = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "rows": rows, "average": avg}
    return table, "\n".join(md) + "\n", data


def eval_command(
    benchmarks: Annotated[str, typer.Option(help="Comma-separated: gsm8k,math500,...")] = (
        "gsm8k,math500"
    ),
    model: Annotated[str, typer.Option(help="Alias (smollm2), local folder or hub id.")] = (
        "smollm2"
    ),
    format: FormatOpt = "qwen-tir",
    backend: Annotated[BackendName, typer.Option(
        help="Model backend: transformers, openai (any OpenAI-compatible server, e.g. vllm "
             "serve) or vllm.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Variable holding the server's key.")] = (
        "OPENAI_API_KEY"
    ),
    n: Annotated[int, typer.Option(help="Samples per problem for maj@N / RM@N.")] = 1,
    rm: Annotated[str | None, typer.Option(help="Reward model folder for RM@N.")] = None,
    search_beam: Annotated[int, typer.Option(
        help="Also run RM-guided step search with this beam width (M = --n continuations "
             "per step); 0: off.")] = 0,
    value: Annotated[str | None, typer.Option(
        help="Value model folder (tirforge train value) scoring the step search's partial "
             "solutions instead of --rm.")] = None,
    limit: Annotated[int | None, typer.Option(help="First N problems of each set.")] = None,
    temperature: Annotated[float, typer.Option(help="Temperature of the N samples.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="top-p of the N samples.")] = 0.8,
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per turn at most.")] = 1024,
    concurrency: Annotated[int | None, typer.Option(
        help="Trajectories in flight; with --ray per actor, default: its node's CPUs. "
             "\\[default: 4]")] = None,
    out: Annotated[Path, typer.Option(help="Folder of the stores and result files.")] = Path(
        "runs/eval"),
    executor: ExecutorOpt = "local",
    sandbox: SandboxOpt = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    replay: Annotated[Path | None, typer.Option(
        help="Testing: replay these assistant turns (JSON list) instead of a model.")] = None,
    allow_network: Annotated[bool, typer.Option(
        help="Allow hub downloads (the model, and a benchmark with no local copy).")] = False,
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    ray_actors: RayActors = None,
    ray_gpus_per_actor: RayGpus = 0.0,
) -> None:
    """Evaluate a model: greedy, maj@N and RM@N per benchmark, as in the Qwen2.5-Math report."""
    from tirforge.agent.models import ModelNotFoundError
    from tirforge.agent.pipelines.collect import make_run_backend
    from tirforge.executors import KernelPool
    from tirforge.trajectories.datasets import DATASETS, DatasetNotFoundError, resolve

    folder_out(out, what="results folder")
    check_server(backend, base_url)
    if value is not None and search_beam < 1:
        raise typer.BadParameter("--value scores step search: give --search-beam B too",
                                 param_hint="--value")
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    unknown = [b for b in names if b not in DATASETS]
    if not names or unknown:
        raise typer.BadParameter(f"unknown benchmark(s) {unknown}; known: {', '.join(DATASETS)}",
                                 param_hint="--benchmarks")
    try:  # find (or download into the cache) every benchmark before loading a model
        for b in names:
            resolve(b, allow_network=allow_network)
    except DatasetNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    cfg = EvalConfig(
        benchmarks=names, model="replay" if replay else model, format=format, n=n,
        temperature=temperature, top_p=top_p, limit=limit, max_turns=max_turns,
        max_new_tokens=max_new_tokens, timeout=timeout, out=out, rm=rm,
        concurrency=4 if concurrency is None else max(1, concurrency),
        search_beam=search_beam, value=value, executor=executor, sandbox=sandbox,
    )
    warn_unsandboxed(sandbox, executor)
    if ray:
        if search_beam > 0:
            raise typer.BadParameter("step search runs on one machine only",
                                     param_hint="--search-beam with --ray")
        spec = backend_spec(model, backend, replay, base_url, api_key_env, allow_network)
        with ray_collector(spec, cfg.executor_config(), ray_address, ray_actors, concurrency,
                           ray_gpus_per_actor, api_key_env) as rc:
            rows = _run_all(names, cfg, None, None, rc)
        _finish(rows, cfg, out)
        return
    try:
        with console.status(f"Loading {model} ({backend}) ..."):
            backend_obj = make_run_backend(model, replay, allow_network=allow_network,
                                           max_batch=cfg.concurrency, backend=backend,
                                           base_url=base_url, api_key_env=api_key_env,
                                           log=console.log)
    except (ValueError, ImportError, ModelNotFoundError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    with KernelPool(cfg.executor_config()) as pool:
        pool.install_signal_handlers()
        rows = _run_all(names, cfg, backend_obj, pool, None)
    _finish(rows, cfg, out)


def _run_all(names: list[str], cfg: EvalConfig, backend: Any, pool: Any,
             collector: Any) -> dict[str, dict[str, float]]:
    """Every benchmark's row; a store held by another writer ends the command clearly."""
    rows: dict[str, dict[str, float]] = {}
    for bench in names:
        try:
            with console.status(f"{bench}: solving ..."):
                rows[bench] = run_benchmark(bench, cfg, backend, pool,
                                            log=lambda m: console.print(m, style="yellow"),
                                            collector=collector)
        except StoreLocked as e:
            console.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(2) from None
        console.log(f"{bench}: " + ", ".join(
            f"{k} {int(v)}" if k == "problems" else f"{k} {v:.1f}" for k, v in rows[bench].items()))
    return rows


def _finish(rows: dict[str, dict[str, float]], cfg: EvalConfig, out: Path) -> None:
    table, md, data = render(rows, cfg)
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(data, indent=2))
    console.print(f"written: {out / 'results.md'}, {out / 'results.json'}")
