"""Append-only trajectory store: resumable collection with exactly-once results.

A store is a folder of JSONL shards. Every process that writes opens a shard of its own
(``shard-<ns time>-<pid>-<random>.jsonl``), so writers never interleave, and each trajectory goes
out as ONE ``os.write`` of one complete line on an ``O_APPEND`` descriptor. After ``kill -9`` a
shard ends either on a complete line or on a torn tail without a newline; readers skip such a tail
(it was never acknowledged, so it is redone), and the next process writes to a new shard.

Each record is keyed by (problem id, sample index, config hash): ``done_keys`` tells a re-run
what to skip, and readers keep the first record of a key, so a result holds each trajectory once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirforge.trajectories.schema import Trajectory

__all__ = ["Key", "Store", "StoreConfig", "config_hash", "key_of"]

Key = tuple[str, int, str]
"""(problem id, sample index, config hash)."""


def config_hash(config: Any) -> str:
    """Short stable hash of a JSON-able config (dataclasses: pass ``asdict(cfg)``)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def key_of(traj: Trajectory) -> Key:
    if traj.problem_id is None or traj.sample is None or traj.config_hash is None:
        raise ValueError(
            f"trajectory {traj.id} lacks its store key (problem_id, sample, config_hash)"
        )
    return (traj.problem_id, traj.sample, traj.config_hash)


@dataclass
class StoreConfig:
    """How a store writes."""

    fsync: bool = True
    """fsync after every record. Off, a record survives kill -9 (it is in the page cache once
    ``write`` returns) but may be lost on power failure or a kernel crash."""
    shard_max_records: int = 100_000
    """Start a new shard after this many records, so shards stay easy to move and read."""


class Store:
    """A folder of JSONL shards; thread-safe ``add``, tolerant readers."""

    def __init__(self, root: str | Path, config: StoreConfig | None = None):
        self.root = Path(root)
        self.config = config or StoreConfig()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._count = 0
        self.torn: list[str] = []
        """``file:line`` of torn tails skipped by the last read (interrupted writes)."""

    # -- writing ---------------------------------------------------------------------------
    def _open_shard(self) -> int:
        # Nanosecond prefix: name order is creation order, so "first record wins" is stable.
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}"
        path = self.root / f"{name}.jsonl"
        self._count = 0
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)

    def add(self, traj: Trajectory) -> None:
        """Append one keyed trajectory as a single whole-line write."""
        key_of(traj)  # refuse unkeyed records: they could never be resumed
        line = (traj.model_dump_json() + "\n").encode()
        with self._lock:
            if self._fd is None or self._count >= self.config.shard_max_records:
                self.close()
                self._fd = self._open_shard()
            view = memoryview(line)
            while view:  # a regular-file write is whole in practice; loop for the rare short one
                n = os.write(self._fd, view)
                view = view[n:]
            if self.config.fsync:
                os.fsync(self._fd)
            self._count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.jsonl"))

    def _lines(self) -> Iterator[tuple[bytes, str, bool]]:
        """(line, "file:line", is_last_without_newline) over all shards."""
        for path in self.shards():
            data = path.read_bytes()
            lines = data.split(b"\n")
            for i, line in enumerate(lines, 1):
                if line.strip():
                    yield line, f"{path}:{i}", i == len(lines)

    def iter_raw(self) -> Iterator[Trajectory]:
        """Every complete record in shard order, duplicates included (for checking)."""
        self.torn = []
        for line, where, unterminated in self._lines():
            if unterminated:  # torn tail of a killed writer: never acknowledged, redone later
                self.torn.append(where)
                continue
            try:
                yield Trajectory.model_validate_json(line)
            except ValueError as e:
                raise ValueError(f"{where}: not a valid trajectory record: {e}") from e

    def __iter__(self) -> Iterator[Trajectory]:
        """Every trajectory once: the first record of each key wins."""
        seen: set[Key] = set()
        for t in self.iter_raw():
            k = key_of(t)
            if k not in seen:
                seen.add(k)
                yield t

    def read(self) -> list[Trajectory]:
        return list(self)

    def done_keys(self) -> set[Key]:
        """Keys already stored; only the key fields are parsed, so this is fast."""
        keys: set[Key] = set()
        for line, where, unterminated in self._lines():
            if unterminated:
                continue
            try:
                d = json.loads(line)
                keys.add((d["problem_id"], d["sample"], d["config_hash"]))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{where}: not a keyed trajectory record: {e}") from e
        return keys
