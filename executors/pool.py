"""A bounded pool of warm kernels: lease one per trajectory, give it back, it is reset.

Starting a kernel costs ~1 s (process start + preloaded imports); a lease from the pool costs
microseconds. A returned kernel is reset in the background (namespace + work dir cleared, or
restarted if unhealthy) before anyone else gets it, so trajectories never see each other.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tirforge.executors.base import Executor
from tirforge.executors.config import ExecutorConfig


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """A new (not yet started) executor for ``config.backend``."""
    config = config or ExecutorConfig()
    if config.backend == "local":
        from tirforge.executors.local import LocalKernelExecutor

        return LocalKernelExecutor(config)
    if config.backend == "docker":
        from tirforge.executors.docker import DockerKernelExecutor

        return DockerKernelExecutor(config)
    raise ValueError(f"unknown executor backend {config.backend!r} (local or docker)")


class PoolClosed(RuntimeError):
    pass


class KernelPool:
    """``size`` warm kernels of one backend; ``lease`` blocks while all are in use."""

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        *,
        size: int | None = None,
        factory: Callable[[ExecutorConfig], Executor] = make_executor,
    ):
        self.config = config or ExecutorConfig()
        self.size = size if size is not None else self.config.pool_size
        if self.size < 1:
            raise ValueError("pool size must be at least 1")
        self.factory = factory
        self._idle: queue.Queue[Executor] = queue.Queue()
        self._all: list[Executor] = []
        self._lock = threading.Lock()
        self._closed = False
        # Resets run here, off the caller's path; one worker per kernel at most.
        self._resetter = ThreadPoolExecutor(self.size, thread_name_prefix="kernel-reset")
        atexit.register(self.close)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> KernelPool:
        """Start every kernel (in parallel) and wait until all are warm."""
        with ThreadPoolExecutor(self.size) as ex:
            kernels = list(ex.map(lambda _: self._new(), range(self.size)))
        for k in kernels:
            self._idle.put(k)
        return self

    def _new(self) -> Executor:
        k = self.factory(self.config)
        with self._lock:
            if self._closed:
                raise PoolClosed("pool is closed")
            self._all.append(k)
        k.start()
        return k

    def close(self) -> None:
        """Stop every kernel, leased or idle. Safe to call twice (and from atexit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            kernels, self._all = self._all, []
        self._resetter.shutdown(wait=True, cancel_futures=True)
        for k in kernels:
            with contextlib.suppress(Exception):
                k.close()
        atexit.unregister(self.close)

    def __enter__(self) -> KernelPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def install_signal_handlers(self) -> None:
        """On SIGINT/SIGTERM close every kernel first, then let the signal do its usual work."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.close()
                if callable(previous):
                    previous(signum, frame)
                else:
                    signal.signal(signum, signal.SIG_DFL)
                    signal.raise_signal(signum)

            signal.signal(sig, handler)

    # -- leasing ---------------------------------------------------------------------------
    @property
    def idle(self) -> int:
        return self._idle.qsize()

    def lease(self, timeout: float | None = None) -> Executor:
        """Take a warm kernel; waits up to ``timeout`` seconds (None: forever) for one."""
        if self._closed:
            raise PoolClosed("pool is closed")
        try:
            k = self._idle.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no kernel free within {timeout}s (pool size {self.size}, all leased)"
            ) from None
        if not k.is_alive():  # died while idle (e.g. OOM-killed): restart before handing out
            k.restart()
        return k

    def release(self, kernel: Executor) -> None:
        """Give a kernel back; it is reset in the background, then leased again."""
        if self._closed:
            with contextlib.suppress(Exception):
                kernel.close()
            return
        self._resetter.submit(self._reset_and_return, kernel)

    def _reset_and_return(self, kernel: Executor) -> None:
        try:
            kernel.reset()
        except Exception:
            # Unrecoverable kernel: replace it so the pool keeps its size.
            with contextlib.suppress(Exception):
                kernel.close()
            with self._lock:
                if kernel in self._all:
                    self._all.remove(kernel)
            kernel = self._new()
        self._idle.put(kernel)

    @contextlib.contextmanager
    def kernel(self, timeout: float | None = None) -> Iterator[Executor]:
        k = self.lease(timeout)
        try:
            yield k
        finally:
            self.release(k)

    # -- asyncio ---------------------------------------------------------------------------
    async def alease(self, timeout: float | None = None) -> Executor:
        try:  # fast path without a thread hop
            k = self._idle.get_nowait()
        except queue.Empty:
            return await asyncio.to_thread(self.lease, timeout)
        if not k.is_alive():
            await asyncio.to_thread(k.restart)
        return k

    @contextlib.asynccontextmanager
    async def akernel(self, timeout: float | None = None) -> AsyncIterator[Executor]:
        k = await self.alease(timeout)
        try:
            yield k
        finally:
            self.release(k)
