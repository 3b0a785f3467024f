"""The executor interface every backend implements, sync and asyncio."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from tirforge.executors.result import ExecutionResult


@runtime_checkable
class Executor(Protocol):
    """A stateful kernel: cells run one after another in one namespace."""

    def start(self) -> None:
        """Start the kernel (no-op if running) and run the preload code."""

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one cell; never raises for anything the cell does."""

    def interrupt(self) -> None:
        """Interrupt the running cell from another thread (a user pressed Stop)."""

    def reset(self) -> bool:
        """Forget all user state: a fresh kernel, nothing of the old one left. Returns True
        if the whole sandbox had to be restarted (the slow path)."""

    def restart(self) -> None:
        """Restart the kernel process (all state lost), preload again."""

    def is_alive(self) -> bool: ...

    def close(self) -> None:
        """Stop the kernel and release everything it held. Safe to call twice."""


class AsyncExecutor:
    """asyncio face of any Executor: each call runs in a worker thread.

    Kernel round trips block on ZMQ sockets; a thread per in-flight cell keeps the event loop
    free, and one kernel never runs two cells at once (a lock serialises them).
    """

    def __init__(self, executor: Executor):
        self.executor = executor
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self.executor.start)

    async def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        async with self._lock:
            return await asyncio.to_thread(self.executor.run, code, timeout)

    async def reset(self) -> bool:
        async with self._lock:
            return await asyncio.to_thread(self.executor.reset)

    async def close(self) -> None:
        await asyncio.to_thread(self.executor.close)
