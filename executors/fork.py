"""Forking a live kernel: the host's half of ``KernelExecutor.fork`` (the kernel's half is in
``forkserver_kernel.py``), and the sandbox a kernel shares with its forks."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

from jupyter_client import BlockingKernelClient

from tirforge.executors.connection import kernel_client, write_connection_file
from tirforge.executors.control import Control, ControlLost
from tirforge.executors.result import ForkFailed

if TYPE_CHECKING:
    from tirforge.executors.kernel import KernelExecutor


class SharedSandbox:
    """What a kernel and its forks share: one sandbox, its fork server and its slots."""

    def __init__(self, ctl: Control):
        self.ctl = ctl
        self.lock = threading.RLock()  # a fork, a spawn and a member leaving never interleave
        self.members: set[KernelExecutor] = set()
        self.next_slot = 1  # slot 0 is the kernel the sandbox was started for
        self.granted = 1  # kernels the sandbox's memory / process caps are sized for


class ForkingKernel:
    """``fork()`` and membership of a shared sandbox, for ``KernelExecutor`` (a mixin: it uses
    the driver's connection, control socket and backend hooks)."""

    def _detach(self) -> None:
        """Forget the sandbox without stopping it: other members (forks) still use it. The next
        start launches a sandbox of this executor's own."""
        self._sock_dir = None
        self._forks_dir = None

    def _fork_workdir(self, slot: int) -> str:
        """The work dir of the fork in ``slot`` (inside the sandbox)."""
        assert self._forks_dir is not None
        return os.path.join(self._forks_dir, str(slot))

    def _adopt_fork(self, child: KernelExecutor) -> None:
        """Backend bookkeeping for a new fork (a shallow copy of this executor)."""

    def _scale_caps(self, kernels: int) -> None:
        """Size the sandbox's memory and process caps (which every member shares) for
        ``kernels`` kernels: ``memory_mb`` and ``max_processes`` each."""

    def _leave_sandbox(self) -> None:
        """Stop this kernel; stop the sandbox too unless another member still uses it."""
        self._disconnect()
        box, self._box = self._box, None
        last = True
        if box is not None:
            with box.lock:
                box.members.discard(self)
                last = not box.members
                if not last:
                    with contextlib.suppress(ControlLost, RuntimeError, OSError, ValueError):
                        box.ctl.call("kill", slot=self._slot, timeout=10.0)
        if last:
            self._close_ctl()
            self._kill()
        else:
            self._ctl = None
            self._detach()
        self._slot, self._ipc_dir = 0, None

    @property
    def supports_fork(self) -> bool:
        """This backend can ``fork()`` a live kernel."""
        return True

    def fork(self) -> KernelExecutor:
        """A new executor whose kernel is a copy of this one now, without re-running any cell.

        The namespace, imported modules, random generators' states, open objects, execution
        count and the work dir's files (copied to the fork's own work dir) are the parent's at
        the moment of the fork; from then on both run independently. Threads a cell started
        and child processes do not carry over (as with ``os.fork``). The fork lives in the
        parent's sandbox, under its memory / process caps (shared by its kernels, sized
        ``memory_mb`` / ``max_processes`` x their number, grown in doublings) and with its own
        cell timeout, CPU seconds and -- locally -- address space; it is run, reset and closed
        like any kernel. Its ``reset`` (or a restart after its kernel died) moves it to a sandbox of
        its own, and a parent that dies or is closed does not take its forks with it.

        Costs two ``os.fork`` of the kernel process and a new kernel server in the child: 60-170
        ms p50 on a loaded 2-core machine, ~3x less than a reset + replay of 10 sympy cells
        (docs/benchmarks.md). Raises ``ForkFailed`` (``.fault``: ``"kernel_died"`` if
        this kernel is not alive, else ``"start_failed"``) when no fork can be made.
        """
        if self.kc is None or self._box is None or self._ctl is None:
            raise ForkFailed("no kernel to fork: start it first", fault="start_failed")
        box = self._box
        with box.lock:
            if not self._process_alive():
                raise ForkFailed("the kernel to fork is not alive", fault="kernel_died")
            slot = box.next_slot
            box.next_slot += 1
            need = len(box.members) + 1
            if need > box.granted:  # grown in doublings: few updates for a wide search
                box.granted = max(need, 2 * box.granted)
                self._scale_caps(box.granted)
            assert self._sock_dir is not None
            ipc = os.path.join(self._sock_dir, f"f{slot}")
            os.mkdir(ipc, 0o700)
            conn_file, info = write_connection_file(ipc)
            workdir = self._fork_workdir(slot)
            child: KernelExecutor | None = None
            self._unlock_sock_dir(conn_file)
            # Connect first: the requests wait in ZMQ until the fork binds its sockets.
            kc: BlockingKernelClient | None = kernel_client(info, retry_ms=2)
            try:
                pid = self._fork_call(conn_file, workdir)
                box.ctl.call("adopt", slot=slot, pid=pid, workdir=workdir)
                child = copy.copy(self)
                child.config = dataclasses.replace(self.config)
                child.kc, child._slot, child._ipc_dir, child.workdir = None, slot, ipc, workdir
                child._spawns = max(self._spawns, 1)
                self._adopt_fork(child)
                box.members.add(child)
                child.kc, kc = kc, None
                child._wait_ready()
            except ForkFailed:
                if child is not None:
                    child.close()
                raise
            except Exception as e:
                if child is not None:
                    child.close()
                raise ForkFailed(f"fork failed: {type(e).__name__}: {e}",
                                 fault="start_failed") from e
            finally:
                if kc is not None:
                    kc.stop_channels()
                with contextlib.suppress(FileNotFoundError):
                    os.remove(conn_file)
                self._lock_sock_dir()
        return child

    def _fork_call(self, conn_file: str, workdir: str) -> int:
        """Have the kernel fork itself (a silent cell: no history, no execution count);
        returns the fork's pid."""
        assert self.kc is not None and self.workdir is not None
        mod = "__import__('sys').modules['_tirforge_fork']"
        code = f"{mod}.fork({conn_file!r}, {self.workdir!r}, {workdir!r})"
        msg_id = self.kc.execute(code, silent=True, store_history=False,
                                 user_expressions={"pid": f"{mod}.pid"},
                                 allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            if time.monotonic() > deadline:
                raise ForkFailed("the kernel did not fork in time", fault="start_failed")
            try:
                reply = self.kc.shell_channel.get_msg(timeout=0.5)
            except queue.Empty:
                if not self._process_alive():
                    raise ForkFailed("the kernel died while forking",
                                     fault="kernel_died") from None
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        self._drain_iopub(msg_id)
        content = reply["content"]
        if content.get("status") != "ok":
            raise ForkFailed(f"the kernel could not fork: {content.get('ename')}: "
                             f"{content.get('evalue')}", fault="start_failed")
        pid = content["user_expressions"]["pid"]
        return int(pid["data"]["text/plain"])

    def _drain_iopub(self, msg_id: str) -> None:
        """Read iopub up to ``msg_id``'s idle status, so the next cell starts clean."""
        assert self.kc is not None
        with contextlib.suppress(queue.Empty):
            while True:
                msg = self.kc.iopub_channel.get_msg(timeout=1.0)
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    return
