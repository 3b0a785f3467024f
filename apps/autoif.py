"""``tirforge autoif``: the AutoIF pipeline's face (parses, calls the library, renders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tirforge.apps.choices import (
    BackendName,
    ExecutorOpt,
    SandboxOpt,
    check_server,
    warn_unsandboxed,
)

console = Console()


def autoif(
    workdir: Annotated[Path, typer.Argument(help="Work folder: one file per stage (resumable).")],
    stages: Annotated[str, typer.Option(
        help="Comma-separated stages to run, in pipeline order: seeds, augment, verifiers, "
             "crossval, backtranslate, queries, responses, export; all: every one.")] = "all",
    seeds: Annotated[Path | None, typer.Option(
        help="Seed instructions: JSONL with 'instruction' (or a text file, one a line); "
             "default: the ~30 shipped seeds.")] = None,
    seed_limit: Annotated[int | None, typer.Option(help="First N seeds only.")] = None,
    queries: Annotated[str | None, typer.Option(
        help="User queries: JSONL file, saved HF dataset folder or hub name; default: the "
             "shipped sample.")] = None,
    query_field: Annotated[str, typer.Option(help="Column holding the query.")] = "query",
    model: Annotated[str, typer.Option(help="Model alias, local folder or hub id.")] = "smollm2",
    backend: Annotated[BackendName, typer.Option(help="Model backend.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    augment_rounds: Annotated[int, typer.Option(help="Self-instruct generations.")] = 4,
    max_instructions: Annotated[int, typer.Option(help="Seeds + new instructions at most.")
                                ] = 200,
    verifiers: Annotated[int, typer.Option(help="Verifier drafts per instruction (K).")] = 4,
    min_functions: Annotated[int, typer.Option(help="Cross-validation: functions kept.")] = 3,
    min_cases: Annotated[int, typer.Option(help="Cross-validation: cases kept.")] = 10,
    min_accuracy: Annotated[float, typer.Option(help="Function-vs-cases agreement.")] = 0.8,
    backtranslate: Annotated[bool, typer.Option(help="Run the back-translation check.")] = True,
    judge: Annotated[str, typer.Option(
        help="Back-translation judge: 'policy' (the model itself) or an NLI model path.")
    ] = "policy",
    queries_per_instruction: Annotated[int, typer.Option(help="Queries per instruction.")] = 2,
    responses: Annotated[int, typer.Option(help="Responses per (query, instruction).")] = 4,
    sft_threshold: Annotated[float, typer.Option(help="SFT: pass rate at least.")] = 1.0,
    dpo_chosen_min: Annotated[float, typer.Option(help="DPO chosen: pass rate at least.")
                              ] = 0.5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generation at most.")] = 512,
    max_batch: Annotated[int, typer.Option(help="Requests per model batch.")] = 8,
    cell_timeout: Annotated[float, typer.Option(help="Seconds one verifier call may run.")
                            ] = 2.0,
    kernels: Annotated[int, typer.Option(help="Sandbox kernels.")] = 1,
    executor: ExecutorOpt = "local",
    sandbox: SandboxOpt = "auto",
    seed: Annotated[int, typer.Option(help="Sampling / drawing seed.")] = 0,
    replay: Annotated[Path | None, typer.Option(
        help="Testing: scripted model outputs, a JSON list (served in order) or an object "
             "{request tag: \\[turns]}; tags: augment:round-N, verify:ID#K, backtr:ID, "
             "judge:ID, respond:ID#K (README, AutoIF).")] = None,
    allow_network: Annotated[bool, typer.Option(help="Allow hub downloads.")] = False,
) -> None:
    """Make instruction-following SFT/DPO data verified by code run in the sandbox (AutoIF)."""
    from tirforge.agent.models import ModelNotFoundError
    from tirforge.agent.pipelines.autoif import STAGES, AutoIFConfig, run_autoif, verifier_pool
    from tirforge.agent.pipelines.autoif.pipeline import NEEDS_KERNEL, NEEDS_MODEL
    from tirforge.agent.pipelines.collect import make_run_backend
    from tirforge.executors import ExecutorConfig

    check_server(backend, base_url)
    names = list(STAGES) if stages == "all" else [s.strip() for s in stages.split(",")]
    try:
        cfg = AutoIFConfig(
            augment_rounds=augment_rounds, max_instructions=max_instructions,
            verifiers_per_instruction=verifiers, min_functions=min_functions,
            min_cases=min_cases, min_accuracy=min_accuracy, cell_timeout=cell_timeout,
            backtranslate=backtranslate, judge=judge,
            queries_per_instruction=queries_per_instruction, responses_per_query=responses,
            sft_threshold=sft_threshold, dpo_chosen_min=dpo_chosen_min, temperature=temperature,
            max_new_tokens=max_new_tokens, max_batch=max_batch, seed=seed)
        bad = [s for s in names if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
        model_backend = None
        if NEEDS_MODEL & set(names):
            if replay is not None:
                from tirforge.agent.backends.replay import ReplayBackend

                script = json.loads(replay.read_text())
                if not isinstance(script, list | dict):
                    raise ValueError(f"{replay}: expected a JSON list or object")
                model_backend = ReplayBackend(script)
            else:
                with console.status(f"Loading {model} ({backend}) ..."):
                    model_backend = make_run_backend(
                        model, allow_network=allow_network, max_batch=max_batch,
                        backend=backend, base_url=base_url, log=console.log)
        pool = verifier_pool(ExecutorConfig(backend=executor, sandbox=sandbox), kernels, cfg) \
            if NEEDS_KERNEL & set(names) else None
    except (ValueError, ImportError, OSError, ModelNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if pool is not None:
        warn_unsandboxed(sandbox, executor)
    try:
        stats = run_autoif(workdir, cfg=cfg, backend=model_backend, pool=pool, stages=names,
                           seeds=seeds, seed_limit=seed_limit, queries=queries,
                           query_field=query_field, model="replay" if replay else model,
                           log=console.log)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    finally:
        if pool is not None:
            pool.close()
    table = Table("stage", "yield", "seconds", title=f"AutoIF {workdir}")
    for name in (s for s in STAGES if s in stats):
        row = {k: v for k, v in stats[name].items() if k != "seconds"}
        table.add_row(name, ", ".join(f"{k} {v}" for k, v in row.items()),
                      f"{stats[name]['seconds']:.1f}")
    console.print(table)
    if "export" in stats:
        console.print(f"train: tirforge train sft --train-file {workdir}/8_export/sft.jsonl; "
                      f"tirforge train dpo --train-file {workdir}/8_export/dpo.jsonl")


def register(app: typer.Typer) -> None:
    app.command("autoif")(autoif)
