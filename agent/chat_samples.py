"""Where the extra samples of a sampled chat question run: forks of the session kernel, or
(where the executor cannot fork, or a fork fails) kernels of a second pool that first replay
the conversation's cells. A mixin of ``ChatService``: it uses the service's pools, lock and
config."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from tirforge.agent.chat_session import Cancelled, ChatSession
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.executors.result import ForkFailed


class SampleKernels:
    """The sample kernels' half of ``ChatService`` (see the module doc)."""

    config: Any
    executor_config: ExecutorConfig
    _lock: threading.Lock
    _pool: KernelPool | None
    _sample_pool: KernelPool | None
    _from_samples: set[int]
    _sample_start: threading.Thread | None
    _samples_ready: threading.Event
    sample_error: str | None

    def warm_samples(self) -> None:
        """Start the sample pool in the background (once), e.g. when a sampling strategy is
        picked, so that its kernels are warm by the time the question comes. A no-op when
        samples fork the session kernel (``fork_samples``): the pool is started only if a
        fork fails."""
        if self.config.fork_samples:
            return
        self._start_sample_pool()

    def _start_sample_pool(self) -> None:
        with self._lock:
            if self._sample_start is not None:
                return
            self._sample_start = threading.Thread(target=self._start_samples, daemon=True)
        self._sample_start.start()

    def _start_samples(self) -> None:
        try:
            size = max(1, self.config.max_samples - 1)
            self._sample_pool = KernelPool(self.executor_config, size=size).start()
        except Exception as e:
            self.sample_error = sandbox_help(self.executor_config, e)
        self._samples_ready.set()

    def _give_back(self, kernel: Any) -> None:
        """Return a kernel to the pool it was leased from (it is reset there)."""
        with self._lock:
            sampled = id(kernel) in self._from_samples
            self._from_samples.discard(id(kernel))
        pool = self._sample_pool if sampled else self._pool
        if pool is not None:
            pool.release(kernel)

    def _fork_samples(self, s: ChatSession, count: int) -> list[Any] | None:
        """``count`` forks of the session kernel (its state before any sample runs), leased
        from the session pool; None when forks are off, the executor cannot fork, or a fork
        failed (the samples then replay on the sample pool)."""
        pool = self._pool
        if (count < 1 or not self.config.fork_samples or pool is None
                or not getattr(s.kernel, "supports_fork", False)):
            return None
        forks: list[Any] = []
        try:
            for _ in range(count):
                forks.append(pool.fork(s.kernel, timeout=0))
        except (ForkFailed, TimeoutError, NotImplementedError):
            for k in forks:
                pool.release(k)
            return None
        return forks

    def _wait_sample_pool(self, s: ChatSession, emit: Callable[[tuple], None]) -> KernelPool:
        self._start_sample_pool()
        if not self._samples_ready.is_set():
            emit(("status", "Starting the kernels for the extra samples …"))
            while not self._samples_ready.wait(0.5):
                if s.cancel.is_set():
                    raise Cancelled
        if self._sample_pool is None:
            raise RuntimeError(self.sample_error or "the sample kernels did not start")
        return self._sample_pool

    def _lease(self, pool: KernelPool, s: ChatSession) -> Any:
        """A kernel for an extra sample: from the sample pool, or an idle one of the session
        pool while a session holds a sample-pool kernel it was swapped; waits (for a reset)
        but not past a Stop."""
        while True:
            if s.cancel.is_set():
                raise Cancelled
            with contextlib.suppress(TimeoutError):
                kernel = pool.lease(timeout=0.25)
                with self._lock:
                    self._from_samples.add(id(kernel))
                return kernel
            if self._pool is not None:
                with contextlib.suppress(TimeoutError):
                    return self._pool.lease(timeout=0)


def sandbox_help(cfg: ExecutorConfig, e: Exception) -> str:
    fix = (
        "start Docker and build the image: `tirforge sandbox build`"
        if cfg.backend == "docker"
        else "install bubblewrap (`apt-get install bubblewrap`) or start with `--sandbox none`"
    )
    return f"The code sandbox ({cfg.backend}) is unavailable: {e}. To fix: {fix}."
