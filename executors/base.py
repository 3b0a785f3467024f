"""The executor interface every backend implements, sync and asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor as ThreadPool
from typing import Any, Protocol, TypeVar, runtime_checkable

from tirforge.executors.result import ExecutionResult

T = TypeVar("T")


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

    @property
    def supports_fork(self) -> bool:
        """``fork()`` works on this executor (False: restore state by replaying cells)."""
        return False

    def fork(self) -> Executor:
        """A new executor whose kernel holds this one's state now (namespace, modules, files),
        without re-running cells; both go on independently. Raises ``ForkFailed``
        (``tirforge.executors.result``) when the kernel cannot be forked, NotImplementedError
        where the backend cannot fork at all (``supports_fork`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork a kernel")


class AsyncExecutor:
    """asyncio face of any Executor: each call runs in a worker thread.

    Kernel round trips block on ZMQ sockets; a thread per in-flight cell keeps the event loop
    free, and one kernel never runs two cells at once (a lock serialises them). ``threads``:
    the pool those threads come from (None: asyncio's default pool, which has at most
    min(32, CPUs + 4) threads; give one as wide as the number of kernels used at once).
    The coroutine graph of ``tirforge.agent.graph`` runs its cells through this class.
    """

    def __init__(self, executor: Executor, threads: ThreadPool | None = None):
        self.executor = executor
        self._threads = threads
        self._lock = asyncio.Lock()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def start(self) -> None:
        await self._call(self.executor.start)

    async def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one cell (``Executor.run``); waits for the kernel's previous cell first."""
        async with self._lock:
            return await self._call(self.executor.run, code, timeout)

    async def reset(self) -> bool:
        async with self._lock:
            return await self._call(self.executor.reset)

    @property
    def supports_fork(self) -> bool:
        """The wrapped executor can ``fork()``."""
        return bool(getattr(self.executor, "supports_fork", False))

    async def fork(self) -> AsyncExecutor:
        """``Executor.fork`` of the wrapped kernel, wrapped the same way."""
        async with self._lock:
            child = await self._call(self.executor.fork)
        return AsyncExecutor(child, self._threads)

    async def close(self) -> None:
        await self._call(self.executor.close)
