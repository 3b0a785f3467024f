"""``tirforge train sft|rm|dpo|grpo|value`` and ``tirforge score``: the training commands.

Every trainer reads a YAML config (``--config``, see configs/) whose fields are the trainer's
config dataclass; every field of a simple type (str, int, float, bool) is also an option,
generated from the dataclass (its docstring is the help), as TRL's ``TrlParser`` does, and
options override the YAML. ``--model`` takes an alias (smollm2), a local folder or (with
network) a hub id. A trainer's module (and torch) is imported only when its command runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from tirforge.apps.choices import ExecutorName, SandboxMode, warn_unsandboxed
from tirforge.apps.outputs import jsonl_out
from tirforge.trajectories.messages import Style

console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]

# Extra spellings users have: the generated option is --<field-name>, these are added to it.
ALIASES = {
    "resume_from_checkpoint": ("--resume",),
    "rm_path": ("--rm",),
}
BOOL_FLAGS = {"only_correct": "--only-correct/--all"}
# Fields typed `str` in the configs whose values are closed sets: refused while parsing.
CHOICES = {"executor": ExecutorName, "sandbox": SandboxMode, "style": Style}
HELP = {
    "model": "Alias (smollm2), local folder or hub id. \\[default: smollm2, or the config's]",
    "resume_from_checkpoint": "Resume: a checkpoint folder, or 'latest' in --output-dir.",
}


def _config(cls, config: Path | None, needs_data: bool = True, **overrides: Any):
    """Build a trainer config from YAML + options, resolving model aliases; exit 2 on errors."""
    from tirforge.agent.models import DEFAULT_MODEL, ModelNotFoundError, resolve_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = cls.from_yaml(config, **overrides)
        if not cfg.model:  # as solve / collect / autoif: the embedded default model
            cfg.model = DEFAULT_MODEL
            console.print(f"note: no --model, training the default model ({DEFAULT_MODEL})",
                          style="dim")
        if needs_data and not cfg.train_file and not getattr(cfg, "mixture", None):
            raise ValueError("no data: pass --train-file or set `train_file` in the config")
        if cfg.train_file and not Path(cfg.train_file).exists():  # before a model loads
            raise ValueError(f"no training data at {cfg.train_file}")
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
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"[green]saved[/green] {out}")


def _option_type(hint: Any) -> Any:
    """The option type of a field: str, int, float, bool or a Literal of strings (a choice,
    refused while parsing when not one of them), optional allowed; None for lists, mappings and
    unions of several types (YAML only)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _option_type(args[0]) if len(args) == 1 else None
    if typing.get_origin(hint) is typing.Literal:
        return hint if all(isinstance(a, str) for a in args) else None
    return hint if hint in (str, int, float, bool) else None


def config_options(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per simple field of dataclass ``cls``, annotated as a Typer option
    defaulting to None (= keep the YAML's or the dataclass's value)."""
    from tirforge.training.config import field_docs

    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):
        typ = CHOICES.get(f.name) or _option_type(hints[f.name])
        if typ is None or f.name.startswith("_"):
            continue
        dashed = "--" + f.name.replace("_", "-")
        decls = ((BOOL_FLAGS.get(f.name, f"{dashed}/--no-{f.name.replace('_', '-')}"),)
                 if typ is bool else (dashed, *ALIASES.get(f.name, ())))
        # Docstrings are reST-ish and may hold brackets ("in [0, 1)"): plain text for Rich.
        text = HELP.get(f.name) or escape(
            docs.get(f.name, "").split(". ")[0].rstrip(".").replace("``", "`") + ".")
        option = typer.Option(*decls, help=text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[typ | None, option]))
    return params


def trainer_command(cls: type, run: Callable[..., None], extra: list[inspect.Parameter] = (),
                    doc: str = "") -> Callable[..., None]:
    """A Typer command: ``--config`` + ``extra`` parameters + an option per field of ``cls``;
    calls ``run(config_path, extras: dict, overrides: dict)``."""
    extra_names = {p.name for p in extra}
    fields = config_options(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=ConfigOpt), *extra, *fields]

    def command(**kwargs: Any) -> None:
        config = kwargs.pop("config")
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k in extra_names}
        run(config, extras, kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    command.__doc__ = doc
    return command


def _offline(name: str, cls_name: str, doc: str) -> Callable[[], Callable[..., None]]:
    """The command builder of a trainer on a trajectory file (sft, rm, dpo)."""

    def build() -> Callable[..., None]:
        mod = importlib.import_module(f"tirforge.training.{name}")
        cls = getattr(mod, cls_name)

        def run(config, _extras, overrides):
            _run(mod.train, _config(cls, config, **overrides))

        return trainer_command(cls, run, doc=doc)

    return build


def _grpo() -> Callable[..., None]:
    from tirforge.training import grpo as mod

    problems = inspect.Parameter(
        "problems", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Path, typer.Option(
            help="JSONL of {problem, answer} or trajectories.")])

    def run(config, extras, overrides):
        from tirforge.agent.pipelines.rollout import run_grpo

        cfg = _config(mod.GRPOTrainConfig, config, needs_data=False, **overrides)
        warn_unsandboxed(cfg.sandbox, cfg.executor, console)
        _run(run_grpo, cfg, extras["problems"])

    return trainer_command(mod.GRPOTrainConfig, run, [problems], doc="GRPO: each rollout is a "
                           "multi-turn agent trajectory; reward = verifier (+ RM shaping).")


def _value() -> Callable[..., None]:
    from tirforge.training import value as mod

    def run(config, _extras, overrides):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from tirforge.agent.models import ModelNotFoundError, resolve_model
        from tirforge.agent.pipelines.value_targets import train_value

        cfg = _config(mod.ValueTrainConfig, config, **overrides)
        try:
            if cfg.rollouts and cfg.rollout_model:
                cfg.rollout_model = resolve_model(cfg.rollout_model, log=console.log)
        except (ValueError, OSError, ModelNotFoundError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        bars = Progress("[bold]rollouts", BarColumn(), MofNCompleteColumn(), "prefixes",
                        TimeRemainingColumn(), console=console, transient=True,
                        disable=not cfg.rollouts)
        task = bars.add_task("rollouts", total=None)

        def progress(done: int, total: int) -> None:
            bars.update(task, completed=done, total=total)

        with bars:
            try:
                _run(lambda c: train_value(c, progress=progress, log=console.log), cfg)
            except typer.Exit:  # a RuntimeError too: _run has reported it
                raise
            except ModelNotFoundError as e:
                console.print(f"[red]error:[/red] {e}")
                raise typer.Exit(2) from None
            except RuntimeError as e:  # some prefixes failed; the finished ones are cached
                console.print(f"[red]error:[/red] {e}")
                raise typer.Exit(1) from None

    return trainer_command(mod.ValueTrainConfig, run, doc=(
        "Step-level value model (MCRL-style): Monte-Carlo values of step prefixes (logged, or "
        "from K fresh rollouts with --rollouts K), conservative and contrastive terms; guides "
        "step search (--value)."))


TRAINERS: dict[str, Callable[[], Callable[..., None]]] = {
    "sft": _offline("sft", "SFTTrainConfig", "Supervised fine-tuning; executor outputs and the "
                    "prompt are masked out of the loss."),
    "rm": _offline("rm", "RMTrainConfig", "Outcome reward model on correct vs incorrect "
                   "trajectories of the same problem."),
    "dpo": _offline("dpo", "DPOTrainConfig", "Offline DPO on correct / incorrect pairs, tool "
                    "outputs masked on both sides."),
    "grpo": _grpo,
    "value": _value,
}
"""Trainer name -> a builder of its command (imports the trainer's module when called)."""


class _Trainers(TyperGroup):
    """``tirforge train``: each trainer's command (and module) is built only when named."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(TRAINERS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in TRAINERS:
            return None
        one = typer.Typer(add_completion=False)
        one.command(name)(TRAINERS[name]())
        return typer.main.get_command(one)


train_app = typer.Typer(
    cls=_Trainers,
    help="Train on trajectories: SFT, reward model, DPO, GRPO with tool rollouts, step-level "
         "value model. --model defaults to smollm2.",
    no_args_is_help=True,
)


def score_command(
    file: Annotated[Path, typer.Argument(help="Trajectory JSONL, or a collect store folder "
                                         "(then --out is needed).")],
    rm_path: Annotated[str, typer.Option("--rm", help="Reward model folder (train rm).")],
    out: Annotated[
        Path | None, typer.Option(help="Write here (*.jsonl) instead of rewriting FILE in place.")
    ] = None,
    style: Annotated[Style, typer.Option(
        help="Layout the RM was trained on.")] = "fenced",
    batch_size: Annotated[int, typer.Option(help="Trajectories per forward pass.")] = 8,
) -> None:
    """Add reward-model scores (the `score` field) to every trajectory in FILE."""
    from tirforge.training.data import load_records, require_trajectories
    from tirforge.training.rm import RewardScorer

    jsonl_out(out)
    if file.is_dir() and out is None:
        raise typer.BadParameter(f"{file} is a folder: give --out FILE.jsonl for the scored "
                                 "trajectories", param_hint="--out")
    try:
        trajs = require_trajectories(load_records(file), "score")
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
