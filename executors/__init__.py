"""Stateful Jupyter kernels that run model-written code."""

from tirforge.executors.local import LocalKernelExecutor
from tirforge.executors.result import ExecutionResult

__all__ = ["ExecutionResult", "LocalKernelExecutor"]
