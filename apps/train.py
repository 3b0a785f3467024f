"""``tirforge train sft|rm|dpo|grpo`` and ``tirforge score``: the training commands.

Every trainer reads a YAML config (``--config``, see configs/) whose fields are the trainer's
config dataclass; the options here override the common ones. ``--model`` takes an alias
(smollm2), a local folder or (with network) a hub id.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

train_app = typer.Typer(
    help="Train on trajectories: SFT, reward model, DPO, GRPO with tool rollouts.",
    no_args_is_help=True,
)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
ModelOpt = Annotated[str | None, typer.Option(help="Alias (smollm2), local folder or hub id.")]
DataOpt = Annotated[str | None, typer.Option(help="Trajectory JSONL or saved HF dataset.")]
OutOpt = Annotated[str | None, typer.Option(help="Output folder (checkpoints, logs).")]
StepsOpt = Annotated[int | None, typer.Option(help="Optimiser steps (-1: by epochs).")]
StyleOpt = Annotated[str | None, typer.Option(help="Trajectory layout: fenced or tool.")]
LoraOpt = Annotated[bool | None, typer.Option("--lora/--no-lora", help="Train a LoRA adapter.")]
ResumeOpt = Annotated[
    str | None, typer.Option(help="Resume: a checkpoint folder, or 'latest' in --output-dir.")
]


def _config(cls, config: Path | None, needs_data: bool = True, **overrides: Any):
    """Build a trainer config from YAML + options, resolving model aliases; exit 2 on errors."""
    from tirforge.agent.models import ModelNotFoundError, resolve_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides["resume_from_checkpoint"] = overrides.pop("resume", None)
    try:
        cfg = cls.from_yaml(config, **overrides)
        if not cfg.model:
            raise ValueError("no model: pass --model or set `model` in the config")
        if needs_data and not cfg.train_file and not getattr(cfg, "mixture", None):
            raise ValueError("no data: pass --train-file or set `train_file` in the config")
        cfg.model = resolve_model(cfg.model, log=console.log)
        if getattr(cfg, "rm_path", None):
            cfg.rm_path = resolve_model(cfg.rm_path, log=console.log)
    except (ValueError, OSError, ModelNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    return cfg


def _run(fn, *args) -> None:
    try:
        out = fn(*args)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"[green]saved[/green] {out}")


@train_app.command()
def sft(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    train_file: DataOpt = None,
    output_dir: OutOpt = None,
    max_steps: StepsOpt = None,
    style: StyleOpt = None,
    lora: LoraOpt = None,
    resume: ResumeOpt = None,
    only_correct: Annotated[
        bool | None, typer.Option("--only-correct/--all", help="RFT: correct trajectories only.")
    ] = None,
) -> None:
    """Supervised fine-tuning; executor outputs and the prompt are masked out of the loss."""
    from tirforge.training import sft as mod

    cfg = _config(mod.SFTTrainConfig, config, model=model, train_file=train_file,
                  output_dir=output_dir, max_steps=max_steps, style=style, lora=lora,
                  resume=resume, only_correct=only_correct)
    _run(mod.train, cfg)


@train_app.command()
def rm(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    train_file: DataOpt = None,
    output_dir: OutOpt = None,
    max_steps: StepsOpt = None,
    style: StyleOpt = None,
    lora: LoraOpt = None,
    resume: ResumeOpt = None,
    loss: Annotated[str | None, typer.Option(help="pairwise or listwise.")] = None,
) -> None:
    """Outcome reward model on correct vs incorrect trajectories of the same problem."""
    from tirforge.training import rm as mod

    cfg = _config(mod.RMTrainConfig, config, model=model, train_file=train_file,
                  output_dir=output_dir, max_steps=max_steps, style=style, lora=lora,
                  resume=resume, loss=loss)
    _run(mod.train, cfg)


@train_app.command()
def dpo(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    train_file: DataOpt = None,
    output_dir: OutOpt = None,
    max_steps: StepsOpt = None,
    style: StyleOpt = None,
    lora: LoraOpt = None,
    resume: ResumeOpt = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta.")] = None,
) -> None:
    """Offline DPO on correct / incorrect pairs, tool outputs masked on both sides."""
    from tirforge.training import dpo as mod

    cfg = _config(mod.DPOTrainConfig, config, model=model, train_file=train_file,
                  output_dir=output_dir, max_steps=max_steps, style=style, lora=lora,
                  resume=resume, beta=beta)
    _run(mod.train, cfg)


def _live_backend(model, tokenizer):
    """The agent's transformers backend around the policy being trained (no reload per step)."""
    from tirforge.agent.backends.hf import TransformersBackend

    class LivePolicyBackend(TransformersBackend):
        def __init__(self):  # skip loading from disk: generate with the live weights
            self.model, self.model_path, self.load_s = model, "policy", 0.0
            self.device = str(next(model.parameters()).device)
            self.tokenizer = copy.copy(tokenizer)
            self.tokenizer.padding_side = "left"

    return LivePolicyBackend()


def agent_rollout(agent_cfg, executor, problem_of: dict[str, str], backend_factory=None):
    """A GRPO ``Rollout``: each prompt is solved by the agent graph with the live policy and a
    kernel that is reset between rollouts (the kernel is in the loop). ``backend_factory(model,
    tokenizer)`` replaces the live-policy backend (tests script the turns with it)."""
    from tirforge.agent.graph import solve

    def rollout(prompts, model, tokenizer):
        backend = (backend_factory or _live_backend)(model, tokenizer)
        out = []
        for messages in prompts:
            executor.reset()
            problem = problem_of[json.dumps(messages, sort_keys=True)]
            out.append(solve(problem, backend, executor, agent_cfg))
        return out

    return rollout


@train_app.command()
def grpo(
    problems: Annotated[Path, typer.Option(help="JSONL of {problem, answer} or trajectories.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    output_dir: OutOpt = None,
    max_steps: StepsOpt = None,
    lora: LoraOpt = None,
    resume: ResumeOpt = None,
    rm_path: Annotated[str | None, typer.Option("--rm", help="RM to shape the reward.")] = None,
    max_turns: Annotated[int, typer.Option(help="Agent turns per rollout.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per agent turn.")] = 256,
    executor: Annotated[str, typer.Option(help="Kernel backend: local or docker.")] = "local",
    sandbox: Annotated[str, typer.Option(help="Local isolation: auto, bwrap or none.")] = "auto",
) -> None:
    """GRPO: each rollout is a multi-turn agent trajectory; reward = verifier (+ RM shaping)."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.executors import ExecutorConfig, make_executor
    from tirforge.training import grpo as mod

    cfg = _config(mod.GRPOTrainConfig, config, needs_data=False, model=model, output_dir=output_dir,
                  max_steps=max_steps, lora=lora, resume=resume, rm_path=rm_path)
    agent_cfg = AgentConfig(
        max_turns=max_turns,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=cfg.temperature),
    )
    try:
        rows = mod.load_problems(problems, make_prompt=agent_cfg.fmt.build_messages)
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    # The agent builds its own prompt from the problem text; keep the dataset's prompt identical.
    for r in rows:
        r["prompt"] = agent_cfg.fmt.build_messages(r["problem"], hint=agent_cfg.tool_hint)
    problem_of = {json.dumps(r["prompt"], sort_keys=True): r["problem"] for r in rows}
    kernel = make_executor(ExecutorConfig(backend=executor, sandbox=sandbox))
    kernel.start()
    with kernel:
        _run(mod.train, cfg, agent_rollout(agent_cfg, kernel, problem_of), rows)


def score_command(
    file: Annotated[Path, typer.Argument(help="Trajectory JSONL to score.")],
    rm_path: Annotated[str, typer.Option("--rm", help="Reward model folder (train rm).")],
    out: Annotated[
        Path | None, typer.Option(help="Write here instead of rewriting FILE in place.")
    ] = None,
    style: Annotated[str, typer.Option(help="Layout the RM was trained on.")] = "fenced",
    batch_size: Annotated[int, typer.Option(help="Trajectories per forward pass.")] = 8,
) -> None:
    """Add reward-model scores (the ``score`` field) to every trajectory in FILE."""
    from tirforge.training.rm import RewardScorer
    from tirforge.trajectories.schema import read_jsonl

    try:
        trajs = read_jsonl(file)
        scorer = RewardScorer(rm_path, style=style, batch_size=batch_size)
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    scores = scorer.score(trajs)
    target = out or file
    tmp = Path(f"{target}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t, s in zip(trajs, scores, strict=True):
            f.write(t.model_copy(update={"score": s}).model_dump_json() + "\n")
    tmp.replace(target)  # atomic: a crash never leaves a half-written file
    console.print(f"scored {len(trajs)} trajectories -> {target}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``score`` to the main CLI."""
    app.add_typer(train_app, name="train")
    app.command("score")(score_command)
