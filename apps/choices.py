"""The closed option values every command shares (``--backend``, ``--format``, ``--executor``,
``--sandbox``, ``--strategy``), as ``Literal`` types built from the library's own lists.

Typer turns a ``Literal`` into a ``click.Choice``: a bad value is refused while the command line
is parsed (one error naming the valid values), before a model loads or a folder is made, and
``--help`` shows the values.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import typer
from rich.console import Console

from tirforge.agent.backends import BACKENDS
from tirforge.agent.formats import FORMATS
from tirforge.agent.strategies import SOLVE_STRATEGIES
from tirforge.executors.config import ExecutorConfig

_EXEC = typing.get_type_hints(ExecutorConfig)

BackendName = Literal[BACKENDS]  # type: ignore[valid-type]
FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
ExecutorName = _EXEC["backend"]
SandboxMode = _EXEC["sandbox"]
StrategyName = Literal[SOLVE_STRATEGIES]  # type: ignore[valid-type]

ExecutorOpt = Annotated[ExecutorName, typer.Option(
    help="Where model code runs: local (a kernel subprocess, bubblewrap sandbox) or docker.")]
SandboxOpt = Annotated[SandboxMode, typer.Option(
    help="Local isolation: bwrap (no network, host files hidden), none (rlimits and a temp "
         "dir only) or auto (bwrap, refused when it is not installed).")]
FormatOpt = Annotated[FormatName, typer.Option(
    "--format", help="Prompt format: how code and its output are laid out.")]


def check_server(backend: str, base_url: str | None) -> None:
    """``--backend openai`` talks to a server: refuse it without ``--base-url`` while parsing
    (usage error, exit 2), before a store or folder is made."""
    if backend == "openai" and not base_url:
        raise typer.BadParameter("--backend openai needs --base-url (e.g. "
                                 "http://localhost:8000/v1)", param_hint="--base-url")


def warn_unsandboxed(sandbox: str, executor: str = "local", console: Console | None = None
                     ) -> None:
    """One line on stderr when ``--sandbox none`` runs model code on the host unisolated."""
    if sandbox == "none" and executor == "local":
        (console or Console(stderr=True)).print(
            "[yellow]warning:[/yellow] --sandbox none: model-written code runs on this host "
            "without isolation (network and your files are reachable; only rlimits apply)")
