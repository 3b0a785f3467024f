"""Temporary dirs named after the process that owns them, and removal of a dead owner's.

A kernel's work dir (``tirforge-kernel-<pid>-XXXX``) and socket dir (``tirforge-ipc-<pid>-XXXX``)
are removed when the executor closes; a run killed with ``kill -9`` never gets there. The pid in
the name lets the next process that makes one (once per process and prefix) remove those whose
owner is gone. A dir whose pid is alive (or belongs to another user's process, or was reused by
an unrelated one) is kept: a live run's dir is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

__all__ = ["owned_temp_dir", "remove_stale"]

_swept: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(prefix: str, parent: str | None = None) -> list[Path]:
    """Remove the dirs ``<parent>/<prefix><pid>-*`` whose pid is not a live process (and are
    ours to remove); returns them. ``parent``: the system temp dir by default."""
    root = Path(parent or tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]+")
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def owned_temp_dir(prefix: str, parent: str | None = None) -> str:
    """``tempfile.mkdtemp`` named ``<prefix><our pid>-XXXX``; the first call per (prefix,
    parent) in this process first removes the stale ones of dead owners (``remove_stale``)."""
    key = (prefix, parent or "")
    with _lock:
        first = key not in _swept
        _swept.add(key)
    if first:
        remove_stale(prefix, parent)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
