"""``tirforge sandbox``: build and inspect the Docker image the docker executor runs."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tirforge.executors.docker import LABEL as KERNEL_LABEL
from tirforge.executors.sandbox_image import (
    DEFAULT_IMAGE,
    LABEL,
    DockerUnavailable,
    SandboxBuildError,
    build_image,
    docker_client,
)

sandbox_app = typer.Typer(
    help="The Docker sandbox image for --executor docker: build it, check it.",
    no_args_is_help=True,
)
console = Console()


class BuildMethod(StrEnum):
    auto = "auto"
    dockerfile = "dockerfile"
    debootstrap = "debootstrap"


@sandbox_app.command()
def build(
    name: Annotated[str, typer.Option(help="Image name:tag to build.")] = DEFAULT_IMAGE,
    method: Annotated[
        BuildMethod,
        typer.Option(
            help="dockerfile (needs a registry), debootstrap (offline, needs root), or auto: "
            "dockerfile when a registry answers, else debootstrap."
        ),
    ] = BuildMethod.auto,
    force: Annotated[bool, typer.Option(help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the sandbox image (a no-op when it exists, unless --force or --method)."""
    with console.status(f"Building {name} ...") as status:

        def log(line: str) -> None:
            console.print(escape(line), style="dim", highlight=False, soft_wrap=True)
            status.update(f"Building {name}: {escape(line[:80])}")

        try:
            image_id = build_image(name, method.value, log, force=force)
        except (DockerUnavailable, SandboxBuildError) as e:
            console.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(1) from None
    console.print(f"[green]ready:[/green] {name} ({image_id[:19]})")


@sandbox_app.command()
def status(
    name: Annotated[str, typer.Option(help="Image name:tag to look for.")] = DEFAULT_IMAGE,
) -> None:
    """Is Docker reachable and the image built? Exits 1 if the docker executor can't run."""
    table = Table(show_header=False, box=None)
    try:
        client = docker_client(timeout=10)
    except DockerUnavailable as e:
        table.add_row("docker", f"[red]unreachable[/red]: {escape(str(e))}")
        console.print(table)
        raise typer.Exit(1) from None
    try:
        table.add_row("docker", f"[green]running[/green] (server {client.version()['Version']})")
        images = client.images.list(name=name)
        if images:
            image = images[0]
            table.add_row("image", f"[green]{name}[/green] {image.short_id}")
            table.add_row("size", f"{image.attrs['Size'] / 1e6:.0f} MB")
            table.add_row("created", image.attrs["Created"][:19].replace("T", " "))
            table.add_row("built by tirforge", "yes" if LABEL in image.labels else "no (no label)")
        else:
            table.add_row("image", f"[red]{name} missing[/red]: run `tirforge sandbox build`")
        kernels = client.containers.list(filters={"label": KERNEL_LABEL})
        table.add_row("running kernels", str(len(kernels)))
    finally:
        client.close()
    console.print(table)
    if not images:
        raise typer.Exit(1)
