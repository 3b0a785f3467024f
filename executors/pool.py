"""A bounded pool of warm kernels: lease one per trajectory, give it back, it is reset.

Starting a sandbox costs ~1 s (process start + preloaded imports); a lease from the pool costs
microseconds. A returned kernel is reset in the background -- killed with everything it left,
and a fresh kernel forked from the sandbox's warm template (~0.1 s; see ``kernel.py``) --
before anyone else gets it, so trajectories never see each other. ``spare`` extra kernels
cover those 0.1 s: a worker that returns a kernel and leases the next one at once gets a
ready spare instead of waiting for the reset.

Forks (``KernelPool.fork``): a fork of a leased kernel is a lease of its own, bounded by
``max_forks`` and given back with ``release`` like any kernel -- but it is closed there, not
reset for reuse: it lives in its parent's sandbox, which must not be shared with the next
trajectory. A leased kernel whose forks are still out is reset into a sandbox of its own when
it comes back (the slow path, ~1 s), for the same reason.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import queue
import signal
import threading
import time
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
        spare: int | None = None,
        factory: Callable[[ExecutorConfig], Executor] = make_executor,
        max_forks: int | None = None,
    ):
        """``size``: kernels leased at once at most (default ``config.pool_size``); ``spare``:
        extra warm kernels resetting while others are handed out. Leases stay instant while
        ``spare >= size * reset time / time a trajectory holds its kernel``; the default
        ``max(2, size // 8)`` covers trajectories of >= 1.6 s at a 0.2 s reset (measured in
        docs/benchmarks.md); raise it for short trajectories. ``max_forks``: forks out at once
        at most (``fork``; default ``4 * size``)."""
        self.config = config or ExecutorConfig()
        self.size = size if size is not None else self.config.pool_size
        if self.size < 1:
            raise ValueError("pool size must be at least 1")
        self.spare = spare if spare is not None else max(2, self.size // 8)
        if self.spare < 0:
            raise ValueError("spare must be >= 0")
        self._leases = threading.BoundedSemaphore(self.size)
        self.max_forks = max_forks if max_forks is not None else 4 * self.size
        if self.max_forks < 0:
            raise ValueError("max_forks must be >= 0")
        self._fork_leases = threading.BoundedSemaphore(max(self.max_forks, 1))
        self._forks: dict[int, Executor] = {}  # forks out now, by id
        self.factory = factory
        self._idle: queue.Queue[Executor] = queue.Queue()
        self._all: list[Executor] = []
        self._lock = threading.Lock()
        self._closed = False
        # Resets run here, off the caller's path; one worker per kernel at most.
        self._resetter = ThreadPoolExecutor(
            self.size + self.spare, thread_name_prefix="kernel-reset"
        )
        atexit.register(self.close)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> KernelPool:
        """Start every kernel (in parallel) and wait until all are warm."""
        n = self.size + self.spare
        with ThreadPoolExecutor(n) as ex:
            kernels = list(ex.map(lambda _: self._new(), range(n)))
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
        with self._lock:
            forks, self._forks = list(self._forks.values()), {}
        for k in [*forks, *kernels]:
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
        """Kernels ready to lease now (at most ``size + spare``)."""
        return self._idle.qsize()

    @property
    def capacity(self) -> int:
        """Kernels the pool keeps: ``size + spare``."""
        return self.size + self.spare

    def lease(self, timeout: float | None = None) -> Executor:
        """Take a warm kernel; waits up to ``timeout`` seconds (None: forever) while ``size``
        are leased or none is ready. Raises TimeoutError, or PoolClosed."""
        if self._closed:
            raise PoolClosed("pool is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._leases.acquire(timeout=timeout):  # None: wait as long as it takes
            raise TimeoutError(
                f"no kernel free within {timeout}s (pool size {self.size}, all leased)"
            )
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            k = self._idle.get(timeout=left)
        except queue.Empty:
            self._leases.release()
            raise TimeoutError(
                f"no kernel ready within {timeout}s (pool size {self.size}, resets pending)"
            ) from None
        if not k.is_alive():  # died while idle (e.g. OOM-killed): restart before handing out
            k.restart()
        return k

    @property
    def forks(self) -> int:
        """Forks out now (``fork``)."""
        return len(self._forks)

    def fork(self, kernel: Executor, timeout: float | None = None) -> Executor:
        """A fork of ``kernel`` (a kernel leased from this pool, or a fork of one): its state
        now, without re-running cells (``Executor.fork``). Counts as a lease of its own: waits
        up to ``timeout`` seconds while ``max_forks`` are out (TimeoutError), and goes back
        with ``release``, which closes it. Raises ``ForkFailed`` if the kernel cannot fork,
        NotImplementedError if its backend cannot fork at all, PoolClosed."""
        if self._closed:
            raise PoolClosed("pool is closed")
        if not getattr(kernel, "supports_fork", False):
            raise NotImplementedError(f"{type(kernel).__name__} cannot fork")
        if self.max_forks == 0 or not self._fork_leases.acquire(timeout=timeout):
            raise TimeoutError(f"no fork free within {timeout}s ({self.max_forks} out)")
        try:
            child = kernel.fork()
        except BaseException:
            self._fork_leases.release()
            raise
        with self._lock:
            self._forks[id(child)] = child
        return child

    def release(self, kernel: Executor) -> None:
        """Give a kernel back; it is reset in the background, then leased again (a fork is
        closed instead)."""
        with self._lock:
            fork = self._forks.pop(id(kernel), None)
        if fork is not None:
            self._fork_leases.release()
            try:  # closed off the caller's path
                self._resetter.submit(fork.close)
            except RuntimeError:  # the pool is closing: close it here
                with contextlib.suppress(Exception):
                    fork.close()
            return
        self._leases.release()
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
        if not self._leases.acquire(blocking=False):
            return await asyncio.to_thread(self.lease, timeout)
        try:  # fast path without a thread hop
            k = self._idle.get_nowait()
        except queue.Empty:
            self._leases.release()
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
