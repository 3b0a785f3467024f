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

from tirforge.apps.autoif import register as register_autoif_command
from tirforge.apps.choices import (
    BackendName,
    ExecutorOpt,
    FormatOpt,
    SandboxOpt,
    StrategyName,
    check_server,
    warn_unsandboxed,
)
from tirforge.apps.data import register as register_data_commands
from tirforge.apps.eval import eval_command
from tirforge.apps.loop import register as register_loop_command
from tirforge.apps.outputs import jsonl_out
from tirforge.apps.sandbox import sandbox_app
from tirforge.apps.train import register as register_train_commands

app = typer.Typer(
    help="tirforge: tool-integrated mathematical reasoning (models that write and run Python).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _main() -> None:
    """Keep subcommands explicit even while there is only one."""


def _print_step(step, index: int) -> None:
    from tirforge.trajectories.transcript import split_prose

    prose = split_prose(step.text)[0] if step.code is not None else step.text
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
        str,
        typer.Option(help="Alias (smollm2), local model folder or hub id; with --backend openai "
                     "the served model name (\"\": the server's first)."),
    ] = "smollm2",
    format: FormatOpt = "qwen-tir",
    backend: Annotated[
        BackendName, typer.Option(help="Model backend: transformers, openai (any "
                                  "OpenAI-compatible server) or vllm (in-process engine, GPU).")
    ] = "transformers",
    base_url: Annotated[
        str | None, typer.Option(help="Server URL for --backend openai, e.g. "
                                 "http://localhost:8000/v1.")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the server's API key.")
    ] = "OPENAI_API_KEY",
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer (local folder or id) whose chat template the "
                                 "server's model uses; enables exact prefix continuation over "
                                 "/v1/completions (default: --model).")
    ] = None,
    decompose: Annotated[
        bool | None, typer.Option("--decompose/--no-decompose",
                                  help="Start with a sub-task decomposition (default: dotamath).")
    ] = None,
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per model turn at most.")] = 512,
    max_tokens: Annotated[
        int | None, typer.Option(help="Tokens over the whole solution at most.")
    ] = None,
    max_time: Annotated[
        float | None, typer.Option(help="Seconds of generation + execution at most.")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    executor: ExecutorOpt = "local",
    sandbox: SandboxOpt = "auto",
    memory_mb: Annotated[int, typer.Option(help="Memory cap of the kernel (MiB).")] = 2048,
    out: Annotated[
        Path | None, typer.Option(help="Append the trajectory to this JSONL file (*.jsonl).")
    ] = None,
    session_db: Annotated[
        Path | None, typer.Option(help="SQLite file that checkpoints every step (with "
                                  "--thread-id: resume an interrupted session).")
    ] = None,
    thread_id: Annotated[
        str | None, typer.Option(help="Session id in --session-db to start or resume.")
    ] = None,
    allow_network: Annotated[
        bool, typer.Option(help="Allow downloading --model from the Hugging Face hub.")
    ] = False,
    strategy: Annotated[
        StrategyName, typer.Option(help="greedy (one run, streamed); majority, best-of-n or "
                          "weighted-majority (choose one of --n samples); step-search "
                          "(beam search over turns, partial solutions rated by the scorer).")
    ] = "greedy",
    n: Annotated[
        int, typer.Option("--n", help="Samples to choose among; with step-search, "
                          "continuations sampled per kept solution per turn.")
    ] = 4,
    beam: Annotated[
        int, typer.Option(help="step-search: partial solutions kept after each turn.")
    ] = 2,
    rm: Annotated[
        str | None, typer.Option(help="Reward model folder (tirforge train rm) scoring "
                                 "best-of-n, weighted-majority and step-search (default: the "
                                 "model-free ExecutionScorer).")
    ] = None,
    value: Annotated[
        str | None, typer.Option(help="Step-level value model folder (tirforge train value) "
                                 "scoring instead of --rm: rates partial solutions in "
                                 "step-search by their chance of finishing correct.")
    ] = None,
) -> None:
    """Solve PROBLEM: the model writes Python, a Jupyter kernel runs it, the model answers."""
    from tirforge.agent.backends import make_backend
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.backends.openai import ServerUnavailable
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.models import ModelNotFoundError
    from tirforge.agent.strategies import (
        ExecutorUnavailable,
        ScorerRequired,
        solve_with,
        summarize_answers,
    )
    from tirforge.executors import ExecutorConfig
    from tirforge.trajectories.schema import Trajectory, append_jsonl

    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    jsonl_out(out)
    if n < 1 or beam < 1:
        raise typer.BadParameter("--n and --beam must be at least 1")
    if strategy != "greedy" and session_db is not None:
        raise typer.BadParameter("--session-db resumes a single run: use it with "
                                 "--strategy greedy", param_hint="--session-db")
    try:
        cfg = AgentConfig(
            format=format, decompose=decompose, max_turns=max_turns, max_tokens=max_tokens,
            max_time_s=max_time,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed),
        )
        cfg.decomposes  # noqa: B018 - raises early for an unknown format or decomposition
        with console.status(f"Loading {model} ({backend}) ..."):
            t_load = time.perf_counter()
            model_backend = make_backend(
                backend, model, base_url=base_url, api_key_env=api_key_env,
                tokenizer=tokenizer, allow_network=allow_network, log=console.log,
            )
    except (ModelNotFoundError, ValueError, ImportError, ServerUnavailable) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    warn_unsandboxed(sandbox, executor)
    console.log(f"{backend} backend ready in {time.perf_counter() - t_load:.1f}s")
    console.print(Panel(Text(problem), title="problem", border_style="cyan"))
    t0 = time.perf_counter()
    scorer = _solve_scorer(strategy, rm, value)
    status = console.status("thinking ...")

    def on_event(node: str, item) -> None:  # the greedy run, as it streams
        if node == "event":
            if item["kind"] == "step_started":
                status.update("running code ..." if item["node"] == "execute" else "thinking ...")
            return
        steps = item.get("steps")
        if node in ("generate", "decompose") and steps:
            _print_step(steps[-1], len(steps))
        elif node == "execute" and steps:
            _print_output(steps[-1])
        elif node == "reflect" and steps:
            console.print(Text(f"↻ {steps[-1].feedback.strip()}", style="yellow"))

    def on_search_step(i: int, kept: list[Trajectory]) -> None:
        console.log(f"step {i}: kept " + ", ".join(
            f"{t.score:.2f}" + (f" [{t.final_answer or 'no answer'}]" if t.stop_reason else "")
            for t in kept))  # [answer]: a finished candidate

    status.start()
    try:
        res = solve_with(
            strategy, problem, model_backend, cfg,
            ExecutorConfig(backend=executor, timeout=timeout, sandbox=sandbox,  # type: ignore[arg-type]
                           memory_mb=memory_mb),
            n=n, beam=beam, scorer=scorer, reference=answer, model_name=model or backend,
            session_db=session_db, thread_id=thread_id, on_event=on_event,
            on_search_step=on_search_step, on_status=status.update,
        )
    except (ServerUnavailable, ExecutorUnavailable) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except ScorerRequired as e:  # the library's wording names scorer=; say it as options
        console.print(f"[red]error:[/red] --strategy {e.strategy} needs a scorer: pass --rm "
                      "PATH (a reward model) or --value PATH (a value model)")
        raise typer.Exit(2) from None
    finally:
        status.stop()
    traj = res.trajectory
    if strategy != "greedy":  # nothing was streamed: show the chosen solution now
        for i, step in enumerate(traj.steps, 1):
            _print_step(step, i)
            if step.execution is not None:
                _print_output(step)
            if step.feedback:
                console.print(Text(f"↻ {step.feedback.strip()}", style="yellow"))
    verdict_style = {"correct": "bold green", "incorrect": "bold red"}.get(
        traj.verdict or "", "bold yellow"
    )
    console.print(
        f"final answer: [bold]{traj.final_answer}[/bold]   stop: {traj.stop_reason}   "
        + (f"verdict: [{verdict_style}]{traj.verdict}[/]   " if answer is not None else "")
        + f"turns: {len(traj.steps)}   code cells: {len(traj.code_cells)}   "
        + f"time: {time.perf_counter() - t0:.1f}s"
    )
    if strategy != "greedy":
        what = "finished" if strategy == "step-search" else "samples"
        console.print(f"{strategy}: {len(res.candidates)} {what}: "
                      + (summarize_answers(res.candidates) if res.candidates else "none")
                      + (f"   ({res.note})" if res.note else "")
                      + (f"   chosen score {traj.score:.3f}" if traj.score is not None else ""))
    if out is not None:
        append_jsonl(out, traj)
        console.print(f"trajectory appended to {out}")


def _solve_scorer(strategy: str, rm: str | None, value: str | None = None):
    """``solve``'s scorer: the value model of ``--value`` or the RM of ``--rm``, else the
    model-free ``ExecutionScorer`` (said so); None for strategies that score nothing. Exits 2
    when both are given or the model cannot be loaded."""
    from tirforge.agent.strategies import SCORED_STRATEGIES, ExecutionScorer

    if strategy not in SCORED_STRATEGIES:
        return None
    if rm is not None and value is not None:
        console.print("[red]error:[/red] give --rm or --value, not both")
        raise typer.Exit(2)
    if rm is None and value is None:
        console.print("note: no --rm given, scoring with the model-free ExecutionScorer "
                      "(an answer, cells that ran cleanly, few self-corrections)", style="dim")
        return ExecutionScorer()
    what, path = ("value model", value) if value is not None else ("reward model", rm)
    try:
        with console.status(f"Loading {what} {path} ..."):
            if value is not None:
                from tirforge.training.value import ValueScorer

                return ValueScorer(value)
            from tirforge.training.rm import RewardScorer

            return RewardScorer(rm)
    except Exception as e:  # not a folder, not a model: say so instead of a traceback
        console.print(f"[red]error:[/red] could not load the {what} {path}: {e}")
        raise typer.Exit(2) from None


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="Alias (smollm2), local folder, hub id, or the "
                                       "served model name with --backend openai.")] = "smollm2",
    backend: Annotated[BackendName, typer.Option(help="Model backend.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Variable holding the server's key.")] = (
        "OPENAI_API_KEY"
    ),
    executor: ExecutorOpt = "local",
    sandbox: SandboxOpt = "auto",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    max_sessions: Annotated[int, typer.Option(help="Browser sessions (kernels) at once.")] = 4,
    format: FormatOpt = "qwen-tir",
    max_turns: Annotated[int, typer.Option(help="Model turns per question at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per model turn at most.")] = 512,
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 30.0,
    db: Annotated[Path | None, typer.Option(help="SQLite file keeping conversations.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Benchmark data for the examples.")] = Path(
        "../shared/data"
    ),
    allow_network: Annotated[bool, typer.Option(help="Allow hub downloads of --model.")] = False,
    rm: Annotated[str | None, typer.Option(
        "--rm", help="Reward model folder (tirforge train rm) scoring best-of-n and offering "
        "RM-weighted majority; without it best-of-n uses execution heuristics.")] = None,
    samples: Annotated[int, typer.Option(help="Default N for best-of-n / majority.")] = 4,
    max_samples: Annotated[int, typer.Option(help="Largest N offered (kernels: N - 1 more).")] = 8,
) -> None:
    """Serve the chat app: type a problem, watch the model write and run code, and answer."""
    from tirforge.agent.backends import make_backend
    from tirforge.agent.backends.base import Backend, SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.apps.chat import ChatConfig, ChatServer, benchmark_examples, build_app
    from tirforge.executors import ExecutorConfig

    check_server(backend, base_url)
    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warn_unsandboxed(sandbox, executor)

    def load() -> Backend:
        return make_backend(backend, model, base_url=base_url, api_key_env=api_key_env,
                            allow_network=allow_network)

    server = ChatServer(
        load,
        ExecutorConfig(backend=executor, sandbox=sandbox, timeout=timeout),
        AgentConfig(format=format, max_turns=max_turns,
                    sampling=SamplingParams(max_new_tokens=max_new_tokens)),
        ChatConfig(host=host, port=port, max_sessions=max_sessions,
                   db_path=str(db) if db else None, examples=benchmark_examples(data_dir),
                   rm_path=rm, samples=samples, max_samples=max_samples),
        model_name=model,
    )
    print(f"tirforge chat on http://{host}:{port} (the model loads in the background)")
    try:
        build_app(server).queue().launch(
            server_name=host, server_port=port, ssr_mode=False, quiet=True
        )
    finally:
        server.close()


# Registered after solve and chat, so `tirforge --help` lists them in the order of use.
app.command("eval")(eval_command)
register_data_commands(app)  # collect, evolve, select, export
register_train_commands(app)  # train sft|rm|dpo|grpo|value, score
register_loop_command(app)  # loop
register_autoif_command(app)  # autoif
app.add_typer(sandbox_app, name="sandbox")


def main() -> None:  # pragma: no cover - `python -m tirforge.apps.cli`
    app(sys.argv[1:], prog_name="tirforge")


if __name__ == "__main__":  # pragma: no cover
    main()
