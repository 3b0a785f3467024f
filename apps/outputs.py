"""What an ``--out`` path may be, checked before a command does anything slow.

Three kinds of output: a JSONL file (``solve``, ``score``, ``evolve``: the path must end in
``.jsonl``), a dataset (``select``, ``export``: ``trajectories.export.out_format`` decides:
``*.jsonl``, ``*.parquet`` or a folder) and a store / results folder (``collect``, ``eval``: a
path that is not a file and has no file suffix). A refused path exits 2 with one line and
nothing written.
"""

from __future__ import annotations

from pathlib import Path

import typer

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
"""Suffixes that say "a file": a folder output with one is almost surely a mistake."""


def jsonl_out(path: Path | None, option: str = "--out") -> Path | None:
    """``path`` when it names a JSONL file (``*.jsonl``, not a folder), else a usage error."""
    if path is not None and (path.suffix.lower() != ".jsonl" or path.is_dir()):
        raise typer.BadParameter(f"{path}: writes JSON lines; give a path ending in .jsonl",
                                 param_hint=option)
    return path


def dataset_out(path: Path | None, option: str = "--out", overwrite: bool = False
                ) -> Path | None:
    """``path`` when ``save`` can write there (``*.jsonl``, ``*.parquet``, a folder) and it
    holds nothing yet, or ``overwrite`` says to replace it."""
    from tirforge.trajectories.export import out_format

    if path is not None:
        try:
            out_format(path)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=option) from None
        if not overwrite and path.exists() and (path.is_file() or any(path.iterdir())):
            raise typer.BadParameter(f"{path} exists; pass --overwrite to replace it",
                                     param_hint=option)
    return path


def folder_out(path: Path, option: str = "--out", what: str = "store folder") -> Path:
    """``path`` when it can be a folder (not an existing file, no file suffix)."""
    if (path.exists() and not path.is_dir()) or path.suffix.lower() in FILE_SUFFIXES:
        raise typer.BadParameter(f"{path}: {option} is a {what}; give a folder path (no file "
                                 "suffix)", param_hint=option)
    return path
