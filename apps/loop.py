"""``tirforge loop``: the self-improvement loop (``agent.pipelines.loop``) from a YAML config,
with live progress bars on a terminal (a log line per tenth of a collection otherwise) and the
run's summary rendered at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tirforge.apps.choices import warn_unsandboxed

console = Console()


class _Bars:
    """``Progress`` for a terminal: one transient bar per collection."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("correct {task.fields[correct]}"),
                             console=console, transient=True)
        self.tasks: dict[str, Any] = {}

    def __call__(self, what: str, done: int, todo: int, correct: int) -> None:
        if what not in self.tasks:
            self.bars.start()
            self.tasks[what] = self.bars.add_task(what, total=todo, correct=0)
        self.bars.update(self.tasks[what], completed=done, correct=correct)
        if done >= todo:
            self.bars.remove_task(self.tasks[what])
            self.bars.stop()

    def close(self) -> None:
        self.bars.stop()


def loop_command(
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="Loop config YAML, e.g. configs/loop-cpu.yaml.")],
    name: Annotated[str | None, typer.Option(help="Run name (folder under out_dir).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Training rounds R (R+1 evals).")] = None,
    out_dir: Annotated[str | None, typer.Option(help="Parent folder of runs.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Trajectories in flight.")] = None,
) -> None:
    """Self-improvement: per round eval → collect K → (train RM_r) → select distinct correct
    (RM-guided) → SFT, then optional GRPO with the last RM. Re-run the same command to resume:
    finished stages are kept. Benchmarks are read from $TIRFORGE_DATA, ../shared/data or the
    local cache (the Hub only with `allow_network: true` in the config)."""
    from tirforge.agent.pipelines.loop import run_loop
    from tirforge.agent.pipelines.loop_config import LoopConfig

    bars = _Bars() if console.is_terminal else None
    try:
        cfg = LoopConfig.from_yaml(config, name=name, rounds=rounds, out_dir=out_dir,
                                   concurrency=concurrency)
        warn_unsandboxed(cfg.executor.sandbox, cfg.executor.backend, console)
        rows = run_loop(cfg, log=console.log, progress=bars)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    finally:
        if bars is not None:
            bars.close()
    from rich.markdown import Markdown

    console.print(Markdown((cfg.run_dir / "summary.md").read_text()))
    console.print(f"{len(rows)} round rows in {cfg.run_dir / 'metrics.jsonl'}")


def register(app: typer.Typer) -> None:
    """Add ``tirforge loop`` to the top-level CLI."""
    app.command("loop")(loop_command)
