"""A kernel's connection file and the host's client for it (ZMQ ipc, signed)."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import zmq
from jupyter_client import BlockingKernelClient

SOCKETS = ("k-1", "k-2", "k-3", "k-4", "k-5")  # ipc endpoints: "{ip}-{port}" for ports 1..5


def write_connection_file(sock_dir: str) -> tuple[str, dict[str, Any]]:
    """A connection file for ipc transport in ``sock_dir``, always with a random HMAC key."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": os.path.join(sock_dir, "k"),
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }
    path = os.path.join(sock_dir, "kernel.json")
    with open(path, "w") as f:
        json.dump(info, f)
    return path, info


def kernel_client(info: dict[str, Any], retry_ms: int | None = None) -> BlockingKernelClient:
    """A started client for the kernel of ``info``. ``retry_ms``: how often its sockets retry
    a kernel that has not bound its sockets yet (ZMQ's default is 100 ms)."""
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    if retry_ms is not None:  # the client's own context: only its sockets get it
        kc.context.setsockopt(zmq.RECONNECT_IVL, retry_ms)
    kc.start_channels()
    return kc
