"""Stateful Jupyter kernels that run model-written code: local (bubblewrap) and Docker."""

from tirforge.executors.base import AsyncExecutor, Executor
from tirforge.executors.config import ExecutorConfig
from tirforge.executors.local import LocalKernelExecutor
from tirforge.executors.pool import KernelPool, make_executor
from tirforge.executors.result import ExecutionResult, ForkFailed

__all__ = [
    "AsyncExecutor",
    "ExecutionResult",
    "Executor",
    "ExecutorConfig",
    "ForkFailed",
    "KernelPool",
    "LocalKernelExecutor",
    "make_executor",
]
