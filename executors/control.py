"""The host's end of the fork server's control socket (protocol in ``forkserver.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The fork server's source, run as ``python -c SOURCE CONFIG_JSON`` inside the sandbox: the
#: kernel's half first (definitions only), then the server, whose last line starts it.
FORKSERVER_SOURCE = "\n".join(
    (Path(__file__).with_name(name)).read_text()
    for name in ("forkserver_kernel.py", "forkserver.py")
)
CTL_NAME = "ctl"


class ControlLost(RuntimeError):
    """The fork server is gone (killed by a cell, its sandbox died): restart the sandbox."""


class Control:
    """One connection to a fork server; calls are serialised, so any thread may use it."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, path: str, deadline: float, alive: Callable[[], bool]) -> Control:
        """Connect once the server listens at ``path`` (it imports numpy, sympy... first).

        Raises TimeoutError after ``deadline`` (time.monotonic), RuntimeError if ``alive()``
        says the sandbox exited meanwhile.
        """
        next_check = 0.0
        while True:
            if os.path.exists(path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    return cls(s)
                except OSError:
                    s.close()
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("the sandbox's fork server did not start in time")
            if now >= next_check:
                next_check = now + 0.25
                if not alive():
                    raise RuntimeError("the sandbox exited while starting")
            time.sleep(0.01)

    def call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one request, return its reply. Raises ControlLost if the server is gone."""
        with self._lock:
            try:
                self._sock.settimeout(timeout)
                self._sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                line = self._rfile.readline()
            except OSError as e:
                raise ControlLost(f"fork server unreachable: {e}") from None
        if not line:
            raise ControlLost("the fork server exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork server: {reply['error']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._rfile.close()
            self._sock.close()
