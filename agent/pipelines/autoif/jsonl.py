"""Stage files: append-only JSONL that survives ``kill -9`` (one ``os.write`` per line).

A stage appends one record per finished item and fsyncs it; a re-run reads the ids already
there and does only the rest. A killed writer leaves at most a torn last line without a
newline, which readers skip (the item is redone), as ``trajectories.store`` does for shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read(path: Path) -> list[dict[str, Any]]:
    """Complete records of ``path`` in order ([] when it does not exist); a torn tail (no
    final newline, or not JSON) is skipped."""
    return list(iter_records(path))


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # the torn tail of a killed writer (never acknowledged)
    for line in lines:
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer


def done_ids(path: Path, key: str = "id") -> set[str]:
    return {str(r[key]) for r in iter_records(path) if key in r}


class Appender:
    """Appends records to a stage file; each is one complete line, written and fsynced."""

    def __init__(self, path: Path, fsync: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fsync = path, fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # A torn tail from a killed run would glue onto our first line: start a fresh line.
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            os.write(self._fd, b"\n")

    def add(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` (temp file + rename: readers see old or new, whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
