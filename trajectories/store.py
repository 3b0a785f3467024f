"""Append-only trajectory store: resumable collection with exactly-once results.

A store is a folder of JSONL shards. Every process that writes opens a shard of its own
(``shard-<ns time>-<pid>-<random>.jsonl``), so writers never interleave, and each trajectory goes
out as ONE ``os.write`` of one complete line on an ``O_APPEND`` descriptor. After ``kill -9`` a
shard ends either on a complete line or on a torn tail without a newline; readers skip such a tail
(it was never acknowledged, so it is redone), and the next process writes to a new shard.

Each record is keyed by (problem id, sample index, config hash): ``done_keys`` tells a re-run
what to skip, and readers keep the first record of a key, so a result holds each trajectory once.

Exactly once with many writers: a store has ONE writer at a time. The first ``add`` (or an
explicit ``acquire``) takes an exclusive ``flock`` on ``writer.lock`` in the folder and writes
the holder (pid, host, since, command) into it; a second writer - another terminal, an orphan
of an earlier run, a second ``Store`` object in this process - fails at once with
``StoreLocked`` naming the holder. The kernel drops the lock when its holder dies (kill -9
included), so a dead writer never blocks the next run. A writer reads ``done_keys`` only after
it holds the lock, so no key it runs can be written by anyone else. On NFS, Linux turns
``flock`` into a POSIX lock held with the server's lease, so the store may live on a shared
filesystem; a lock whose client crashed is freed when the lease expires (about 90 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirforge.trajectories.schema import Trajectory

__all__ = ["Key", "Store", "StoreConfig", "StoreLocked", "config_hash", "key_of"]

LOCK_NAME = "writer.lock"

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


class StoreLocked(RuntimeError):
    """Another writer holds the store. ``holder``: its pid, host, since (ISO 8601 UTC) and
    command, as it wrote them (empty when it had not written them yet)."""

    def __init__(self, root: Path, holder: dict[str, Any]):
        self.root, self.holder = root, holder
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
               f"since {holder.get('since', '?')}") if holder else "another process"
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(
            f"store {root} is being written by {who}{cmd}; one writer at a time keeps every "
            "record exactly once. Wait for it, or stop it (its records are kept) and re-run."
        )


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder line of a lock file; retried briefly, as a new holder may be writing it."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        try:
            holder = json.loads(raw)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        time.sleep(0.05)
    return {}


class Store:
    """A folder of JSONL shards; thread-safe ``add``, tolerant readers, one writer at a time."""

    def __init__(self, root: str | Path, config: StoreConfig | None = None):
        self.root = Path(root)
        self.config = config or StoreConfig()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._count = 0
        self.torn: list[str] = []
        """``file:line`` of torn tails skipped by the last read (interrupted writes)."""

    # -- the writer lock ---------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def acquire(self) -> Store:
        """Become the store's only writer (idempotent). Raises ``StoreLocked`` at once, naming
        the holder, when another writer holds it."""
        with self._lock:
            if self._lock_fd is not None:
                return self
            # O_CLOEXEC (Python's default): kernels and other children never inherit the lock.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreLocked(self.root, holder) from None
            except BaseException:
                os.close(fd)
                raise
            holder = {
                "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv)[:300],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self._lock_fd = fd
        return self

    def holder(self) -> dict[str, Any] | None:
        """Who writes the store now (pid, host, since, command), or None when nobody does."""
        if self._lock_fd is not None:
            return _read_holder(self._lock_fd)
        if not self.lock_path.exists():
            return None
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        finally:
            os.close(fd)  # also drops a shared lock we took
        return None

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)  # no stale holder line for the next reader
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

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
        if self._lock_fd is None:
            self.acquire()
        with self._lock:
            if self._fd is None or self._count >= self.config.shard_max_records:
                self._close_shard()
                self._fd = self._open_shard()
            view = memoryview(line)
            while view:  # a regular-file write is whole in practice; loop for the rare short one
                n = os.write(self._fd, view)
                view = view[n:]
            if self.config.fsync:
                os.fsync(self._fd)
            self._count += 1

    def close(self) -> None:
        """Close the shard and give up the writer lock (reading stays possible)."""
        with self._lock:
            self._close_shard()
            self._release()

    def _close_shard(self) -> None:
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
