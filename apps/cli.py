"""The ``tirforge`` command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from tirforge.apps.sandbox import sandbox_app

app = typer.Typer(
    help="tirforge: tool-integrated mathematical reasoning (models that write and run Python).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(sandbox_app, name="sandbox")
console = Console()


@app.callback()
def _main() -> None:
    """Keep subcommands explicit even while there is only one."""


def _print_step(step, index: int) -> None:
    from tirforge.agent import format as fmt

    text = step.text
    block = fmt.find_code_block(text) if step.code is not None else None
    prose = text[: fmt._OPEN.search(text).start()] if block else text
    if prose.strip():
        console.print(Text(prose.strip()), style="white")
    if step.code is not None:
        console.print(
            Panel(Syntax(step.code.rstrip(), "python", theme="monokai"), title=f"python [{index}]")
        )


def _print_output(step) -> None:
    res = step.execution
    style = "green" if res.ok else "red"
    title = "output" if res.ok else f"output ({res.error_name or 'timeout'})"
    console.print(Panel(Text(step.output or "(no output)"), title=title, border_style=style))


@app.command()
def solve(
    problem: Annotated[str, typer.Argument(help="The math problem, in plain text or LaTeX.")],
    answer: Annotated[str | None, typer.Option(help="Reference answer to grade against.")] = None,
    model: Annotated[
        str, typer.Option(help="Alias (smollm2), local model folder, or hub id.")
    ] = "smollm2",
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per model turn at most.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    executor: Annotated[
        str, typer.Option(help="Where code runs: local (bubblewrap sandbox) or docker.")
    ] = "local",
    sandbox: Annotated[
        str, typer.Option(help="Local isolation: auto, bwrap or none.")
    ] = "auto",
    memory_mb: Annotated[int, typer.Option(help="Memory cap of the kernel (MiB).")] = 2048,
    out: Annotated[
        Path | None, typer.Option(help="Append the trajectory to this JSONL file.")
    ] = None,
    allow_network: Annotated[
        bool, typer.Option(help="Allow downloading --model from the Hugging Face hub.")
    ] = False,
) -> None:
    """Solve PROBLEM: the model writes Python, a Jupyter kernel runs it, the model answers."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.backends.hf import TransformersBackend
    from tirforge.agent.graph import AgentConfig, solve_stream
    from tirforge.agent.models import ModelNotFoundError, resolve_model
    from tirforge.executors import ExecutorConfig, make_executor
    from tirforge.trajectories.schema import Trajectory, append_jsonl

    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with console.status(f"Resolving model {model} ..."):
            path = resolve_model(model, allow_network=allow_network, log=console.log)
    except ModelNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    with console.status(f"Loading {path} ..."):
        backend = TransformersBackend(path)
    console.log(f"model loaded in {backend.load_s:.1f}s ({backend.device})")
    cfg = AgentConfig(
        max_turns=max_turns,
        cell_timeout=timeout,
        sampling=SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ),
    )
    console.print(Panel(Text(problem), title="problem", border_style="cyan"))
    t0 = time.perf_counter()
    traj: Trajectory | None = None
    exec_cfg = ExecutorConfig(
        backend=executor, timeout=timeout, sandbox=sandbox, memory_mb=memory_mb
    )
    try:
        with console.status(f"Starting a {executor} kernel ..."):
            kernel = make_executor(exec_cfg)
            kernel.start()
    except Exception as e:  # no Docker daemon, no image, no bwrap: say how to fix it
        console.print(f"[red]error:[/red] could not start the {executor} executor: {e}")
        raise typer.Exit(2) from None
    with kernel:
        status = console.status("thinking ...")
        status.start()
        try:
            for node, item in solve_stream(
                problem, backend, kernel, cfg, reference=answer, model_name=model
            ):
                if isinstance(item, Trajectory):
                    traj = item
                    continue
                steps = item.get("steps")
                if node == "generate" and steps:
                    _print_step(steps[-1], len(steps))
                    status.update("running code ..." if steps[-1].code else "thinking ...")
                elif node == "execute" and steps:
                    _print_output(steps[-1])
                    status.update("thinking ...")
                elif node == "reflect" and steps:
                    console.print(Text(f"↻ {steps[-1].feedback.strip()}", style="yellow"))
        finally:
            status.stop()
    assert traj is not None
    verdict_style = {"correct": "bold green", "incorrect": "bold red"}.get(
        traj.verdict or "", "bold yellow"
    )
    console.print(
        f"final answer: [bold]{traj.final_answer}[/bold]   stop: {traj.stop_reason}   "
        + (f"verdict: [{verdict_style}]{traj.verdict}[/]   " if answer is not None else "")
        + f"turns: {len(traj.steps)}   code cells: {len(traj.code_cells)}   "
        + f"time: {time.perf_counter() - t0:.1f}s"
    )
    if out is not None:
        append_jsonl(out, traj)
        console.print(f"trajectory appended to {out}")


def main() -> None:  # pragma: no cover - `python -m tirforge.apps.cli`
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
