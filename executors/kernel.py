"""Driving one ipykernel over ZMQ: the part every backend shares.

A backend only launches and kills the kernel process (``_launch`` / ``_kill``); this class
connects to it, runs cells, enforces timeouts, caps output, resets and restarts. Interrupts go
as a Jupyter ``interrupt_request`` on the control channel, so they work the same whether the
kernel is a local process, inside bubblewrap, or inside a container.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import queue
import time
from typing import Any

from jupyter_client import BlockingKernelClient

from tirforge.executors.config import ExecutorConfig
from tirforge.executors.connection import SOCKETS, kernel_client, write_connection_file
from tirforge.executors.control import CTL_NAME, FORKSERVER_SOURCE, Control, ControlLost
from tirforge.executors.faults import classify
from tirforge.executors.fork import ForkingKernel, SharedSandbox
from tirforge.executors.result import ExecutionResult, SandboxUnavailable, strip_ansi

# Arguments for ipykernel: in-memory history (parallel kernels don't lock one sqlite file); no
# tip in the banner (IPython >= 8.2x picks it with the global `random` on every kernel_info,
# which would move a cell's random state -- a fork's first handshake included).
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--HistoryManager.enabled=False",
               "--InteractiveShell.enable_tip=False"]


_TRUNCATED = "\n...[truncated "  # the marker of _Capped and of the kernel's own caps


class _Capped:
    """Accumulates a stream, keeping the first and last ``cap/2`` characters."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head, self.tail, self.dropped = "", "", 0

    def add(self, text: str) -> None:
        if len(self.head) < self.half:
            take = self.half - len(self.head)
            self.head, text = self.head + text[:take], text[take:]
        if text:
            self.tail += text
            if len(self.tail) > self.half:
                self.dropped += len(self.tail) - self.half
                self.tail = self.tail[-self.half :]

    def value(self) -> str:
        if not self.dropped:
            return self.head + self.tail
        return f"{self.head}\n...[truncated {self.dropped} chars]...\n{self.tail}"


class KernelExecutor(ForkingKernel):
    """Base class: one stateful kernel. Subclasses provide the sandbox (see module doc).

    The sandbox's main process is a fork server (``forkserver.py``) holding a warm, pre-imported
    interpreter. Every kernel is a fresh fork of it; ``reset`` kills the old kernel with every
    process, thread and file it left and forks a new one, so no state crosses a reset.

    ``fork()`` branches a live kernel: a new executor whose kernel is an ``os.fork()`` of this
    one inside the same sandbox (see ``fork``). A kernel and its forks are members of one
    sandbox; the sandbox ends when the last member is closed or leaves it.
    """

    #: Where cells start (and what ``reset`` empties); set by the subclass in ``_launch``.
    workdir: str | None = None
    #: Private dir of the kernel's ipc sockets and the fork server's control socket.
    _sock_dir: str | None = None
    #: Where forks' work dirs go (inside the sandbox), one dir per fork; set in ``_launch``.
    _forks_dir: str | None = None

    def __init__(self, config: ExecutorConfig | None = None, **overrides: Any):
        self.config = dataclasses.replace(config or ExecutorConfig(), **overrides)
        self.kc: BlockingKernelClient | None = None
        self._ctl: Control | None = None
        self._spawns = 0  # kernels forked in this executor's life (the first wipes nothing)
        self._oom_base: int | None = None  # OOM kills counted before the current cell
        self._box: SharedSandbox | None = None  # the sandbox this kernel shares with its forks
        self._slot = 0  # this kernel's slot in it
        self._ipc_dir: str | None = None  # a fork's own socket dir (None: ``_sock_dir``)

    # -- what a backend provides ---------------------------------------------------------
    def _launch(self) -> None:
        """Create ``_sock_dir`` and start the sandbox running ``server_command()``."""
        raise NotImplementedError

    def _kill(self) -> None:
        """Stop the sandbox hard, with everything in it."""
        raise NotImplementedError

    def _sandbox_alive(self) -> bool:
        raise NotImplementedError

    def _wipe_dirs(self) -> list[str]:
        """Dirs (inside the sandbox) the fork server empties between kernels."""
        return [self.workdir] if self.workdir else []

    def _private_pids(self) -> bool:
        """True when the sandbox has its own PID namespace (the server may kill(-1))."""
        return False

    def _unlock_sock_dir(self, conn_file: str) -> None:
        """Let the next kernel bind its sockets and read ``conn_file``."""

    def _lock_sock_dir(self) -> None:
        """The kernel is up: close the socket dir to it again."""

    def _oom_kills(self, status: dict[str, Any]) -> int | None:
        """OOM kills so far in the sandbox's memory cgroup (None: unknown)."""
        return status.get("oom_kills")

    def _cleanup(self) -> None:
        """Release what outlives restarts (work dirs, sockets); called by close."""

    def server_command(self, python: str) -> list[str]:
        """``python -c <fork server> <config>``: the sandbox's main process."""
        assert self._sock_dir is not None and self.workdir is not None
        cfg = {
            "ctl": os.path.join(self._sock_dir, CTL_NAME),
            "workdir": self.workdir,
            "wipe": self._wipe_dirs(),
            "forks": self._forks_dir,
            "pidns": self._private_pids(),
            "preload": self.config.preload,
            "kernel_args": KERNEL_ARGS,
            "max_output_chars": self.config.max_output_chars,
        }
        return [python, "-c", FORKSERVER_SOURCE, json.dumps(cfg)]

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        return self.config.timeout

    def start(self) -> None:
        """Start the sandbox and a kernel, run the preload code; a no-op if already started.

        Raises RuntimeError / TimeoutError if the sandbox or kernel does not come up.
        """
        if self.kc is not None:
            return
        try:
            if self._ctl is None:
                self._start_sandbox()
            self._fresh_kernel()
        except Exception:
            self.close()
            raise

    def _start_sandbox(self) -> None:
        self._launch()
        assert self._sock_dir is not None
        deadline = time.monotonic() + self.config.startup_timeout
        path = os.path.join(self._sock_dir, CTL_NAME)
        self._ctl = Control.connect(path, deadline, self._sandbox_alive)
        self._box = SharedSandbox(self._ctl)
        self._box.members.add(self)
        self._slot, self._ipc_dir = 0, None

    @property
    def _ipc(self) -> str:
        """This kernel's socket dir: the sandbox's, or a fork's own below it."""
        d = self._ipc_dir or self._sock_dir
        assert d is not None
        return d

    def _fresh_kernel(self) -> None:
        """Kill the current kernel (and all it left), fork a new one, connect, preload."""
        assert self._ctl is not None and self._box is not None
        self._disconnect()
        for name in SOCKETS:  # so that waiting for them waits for the *new* kernel
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._ipc, name))
        conn_file, info = write_connection_file(self._ipc)
        with self._box.lock:
            self._unlock_sock_dir(conn_file)
            self._ctl.call("spawn", conn=conn_file, wipe=self._spawns > 0, slot=self._slot,
                           workdir=self.workdir)
            self._spawns += 1
            try:
                self._wait_for_sockets()
                self._connect(info)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(conn_file)
                self._lock_sock_dir()
        status = self._status()
        self._oom_base = self._oom_kills(status) if status else None
        self._preload()

    def _wait_for_sockets(self) -> None:
        ipc = self._ipc
        deadline = time.monotonic() + self.config.startup_timeout
        next_check = time.monotonic() + 0.1
        while not all(os.path.exists(os.path.join(ipc, s)) for s in SOCKETS):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"kernel did not open its sockets within "
                                   f"{self.config.startup_timeout}s")
            if now >= next_check:
                next_check = now + 0.25
                if not self._process_alive():
                    raise RuntimeError("the kernel process exited while starting")
            time.sleep(0.002)

    def _connect(self, info: dict[str, Any]) -> None:
        self.kc = kernel_client(info)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ping with kernel_info until both shell and iopub answer.

        Hand-written rather than ``wait_for_ready``, which drives an asyncio loop internally
        and fails in worker threads while the caller's event loop runs.
        """
        assert self.kc is not None
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            msg_id = self.kc.kernel_info()
            try:
                shell = self.kc.shell_channel
                while shell.get_msg(timeout=1.0)["parent_header"].get("msg_id") != msg_id:
                    pass
            except queue.Empty:
                if not self._process_alive():
                    raise RuntimeError("the kernel process exited while starting") from None
                continue
            # iopub is a SUB socket: only once it delivers is it safe to run cells. Its
            # subscription lands a few ms after connecting; poll briefly and ping again rather
            # than wait long for a status message that was published before it.
            try:
                self.kc.iopub_channel.get_msg(timeout=0.02)
            except queue.Empty:
                continue
            with contextlib.suppress(queue.Empty):
                while True:  # drop the remaining status messages of the pings
                    self.kc.iopub_channel.get_msg(timeout=0.01)
            return
        raise TimeoutError(f"kernel did not answer within {self.config.startup_timeout}s")

    def _preload(self) -> None:
        if not self.config.preload:
            return
        r = self._run(self.config.preload, self.config.startup_timeout, may_restart=False)
        if not r.ok:
            raise RuntimeError(f"kernel preload failed:\n{r.to_text()}")

    def _disconnect(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None

    def _full_restart(self) -> None:
        """Kill the whole sandbox and start a new one (the slow path, ~1 s). A sandbox that
        other members (forks) still use is left to them, and this kernel starts its own."""
        self._leave_sandbox()
        self._start_sandbox()
        self._fresh_kernel()

    def _close_ctl(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def restart(self) -> None:
        """A new kernel: all state is lost, preload runs again.

        A fresh fork of the template (~0.1 s); the whole sandbox is restarted only if that
        fails (the fork server was killed, the sandbox died).
        """
        self.reset()

    def reset(self) -> bool:
        """Forget everything for the next trajectory: a fresh kernel, empty work dir and /tmp,
        no process, thread or file of the previous one. Returns True if the whole sandbox had
        to be restarted (slow path) rather than a new kernel forked."""
        if self._ctl is None:
            self.start()
            return False
        if self._box is not None and len(self._box.members) > 1:
            # Forks share the sandbox (its /tmp, its caps): a kernel that forgets everything
            # leaves them their sandbox and starts one of its own.
            self._full_restart()
            return True
        try:
            self._fresh_kernel()
            return False
        except Exception:
            self._full_restart()
            return True

    def _status(self) -> dict[str, Any] | None:
        if self._ctl is None:
            return None
        try:
            return self._ctl.call("status", timeout=10.0, slot=self._slot)
        except (ControlLost, RuntimeError):
            return None

    def _process_alive(self) -> bool:
        status = self._status()
        return bool(status and status["alive"])

    def is_alive(self) -> bool:
        return self.kc is not None and self._process_alive()

    def close(self) -> None:
        """Stop the kernel and remove everything it used (its sandbox too, unless forks still
        use it). Safe to call twice."""
        try:
            self._leave_sandbox()
        finally:
            self._cleanup()

    def __enter__(self) -> KernelExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running cells ---------------------------------------------------------------------
    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Execute one cell; never raises for anything the cell does.

        ``timeout`` (seconds) defaults to ``config.timeout``. If no kernel can be started the
        result says so (``fault="start_failed"`` or ``"sandbox_unavailable"``) instead of raising.
        """
        try:
            self.start()
        except SandboxUnavailable as e:
            return ExecutionResult(
                error_name="SandboxUnavailable", error_value=str(e)[:2000],
                fault="sandbox_unavailable",
            )
        except Exception as e:  # the machinery failed, not the cell
            return ExecutionResult(
                error_name="KernelStartFailed", error_value=str(e)[:2000], fault="start_failed"
            )
        return self._run(code, self.timeout if timeout is None else timeout, may_restart=True)

    def _run(self, code: str, timeout: float, may_restart: bool) -> ExecutionResult:
        assert self.kc is not None
        t0 = time.monotonic()
        oom_base = self._oom_base
        res = ExecutionResult(timeout_s=timeout)
        out, err = _Capped(self.config.max_output_chars), _Capped(self.config.max_output_chars)
        # stop_on_error=False: otherwise ipykernel aborts the next request that arrives soon after
        # an error (our own interrupt included), returning nothing for it.
        msg_id = self.kc.execute(
            code, store_history=True, allow_stdin=False, stop_on_error=False
        )
        idle = self._collect(msg_id, res, out, err, deadline=t0 + timeout)
        if not idle and self._process_alive():
            # Overran: interrupt (KeyboardInterrupt inside the cell), then give it a moment.
            res.timed_out = True
            self._interrupt()
            grace = time.monotonic() + self.config.interrupt_grace
            idle = self._collect(msg_id, res, out, err, deadline=grace)
        res.stdout, res.stderr = out.value(), err.value()
        died, status = False, None
        if not idle:
            # Dead, or deaf to interrupts (e.g. SIGINT ignored, stuck in C): restart.
            status = self._status()
            died = not (status and status["alive"])
            if not res.timed_out:
                res.error_name, res.error_value = "KernelDied", "the kernel process exited"
            if may_restart:
                self.restart()
                res.restarted = True
        else:
            self._drain_shell(msg_id)
        if res.timed_out and res.error_name == "KeyboardInterrupt":
            res.error_name = res.error_value = res.traceback = None  # the interrupt was ours
        text_out = "".join([res.result or "", *res.display_text, res.stdout, res.stderr])
        ooms = self._oom_kills(status) if status else None
        res.fault = classify(
            res,
            died=died,
            died_signal=status.get("signal") if status else None,
            oom_killed=ooms is not None and oom_base is not None and ooms > oom_base,
            truncated=out.dropped > 0 or err.dropped > 0 or _TRUNCATED in text_out,
        )
        if ooms is not None:
            self._oom_base = ooms
        res.duration_s = time.monotonic() - t0
        return res

    def interrupt(self) -> None:
        """Interrupt the running cell (KeyboardInterrupt inside it); safe from another thread
        and a no-op when no kernel runs. The cell's ``run`` returns with the error."""
        if self.kc is not None:
            self._interrupt()

    def _interrupt(self) -> None:
        assert self.kc is not None
        msg = self.kc.session.msg("interrupt_request", content={})
        self.kc.control_channel.send(msg)

    def _collect(
        self, msg_id: str, res: ExecutionResult, out: _Capped, err: _Capped, deadline: float
    ) -> bool:
        """Read iopub messages of ``msg_id`` into ``res`` until idle (True) or deadline/death."""
        assert self.kc is not None
        cap = self.config.max_output_chars
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                # Short polls so a dead kernel is noticed well before the deadline.
                msg = self.kc.iopub_channel.get_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self._process_alive():
                    return False
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue  # left over from an earlier, interrupted cell
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (out if content["name"] == "stdout" else err).add(content["text"])
            elif kind == "execute_result":
                res.result = _cap(content["data"].get("text/plain"), cap)
            elif kind == "display_data":
                data = content["data"]
                if "image/png" in data and len(res.images) < 16:
                    res.images.append(base64.b64decode(data["image/png"]))
                if data.get("text/plain") is not None and len(res.display_text) < 64:
                    res.display_text.append(_cap(data["text/plain"], cap))
            elif kind == "error":
                res.error_name, res.error_value = content["ename"], _cap(content["evalue"], cap)
                res.traceback = _cap(strip_ansi("\n".join(content["traceback"])), cap)
            elif kind == "status" and content["execution_state"] == "idle":
                return True

    def _drain_shell(self, msg_id: str) -> None:
        # The execute_reply arrives on the shell channel; consume it so replies don't pile up.
        assert self.kc is not None
        try:
            while True:
                reply = self.kc.shell_channel.get_msg(timeout=1.0)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return
        except queue.Empty:
            return


def _cap(text: str | None, cap: int) -> str | None:
    if text is None or len(text) <= cap:
        return text
    c = _Capped(cap)
    c.add(text)
    return c.value()
