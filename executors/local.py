"""A stateful Jupyter kernel on this machine, driven through jupyter_client.

One executor = one kernel = one trajectory's namespace: each ``run`` executes only the new cell,
earlier state stays in the kernel. A cell that overruns its timeout is interrupted (SIGINT);
a kernel that does not come back, or dies, is restarted and the result says state was lost.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from tirforge.executors.result import ExecutionResult, strip_ansi

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def scrubbed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) minus anything that looks like a secret."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if not any(m in k.upper() for m in _SECRET_MARKERS)}


class LocalKernelExecutor:
    """Run Python cells in an ipykernel subprocess of this interpreter (``sys.executable``)."""

    def __init__(
        self,
        timeout: float = 10.0,
        *,
        startup_timeout: float = 60.0,
        interrupt_grace: float = 3.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.interrupt_grace = interrupt_grace
        self._own_cwd = cwd is None  # a temp dir we made is ours to delete
        self.cwd = cwd
        # Model-written code must not see API keys; an explicit env is taken as given.
        self.env = scrubbed_env() if env is None else dict(env)
        self.km: KernelManager | None = None
        self.kc: Any = None  # a BlockingKernelClient once started
        self._sock_dir: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the kernel and wait until it answers; a no-op if already started."""
        if self.km is not None:
            return
        if self.cwd is None:
            self.cwd = tempfile.mkdtemp(prefix="tirforge-kernel-")
        # ZMQ over ipc sockets in a private dir: no TCP port races, nothing other users can reach.
        self._sock_dir = tempfile.mkdtemp(prefix="tirforge-ipc-")
        self.km = KernelManager(
            kernel_name="python3",
            # No kernel dirs: only ipykernel's own spec, so no user-installed "python3" spec can
            # point the kernel at another interpreter; it runs sys.executable.
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[]),
            transport="ipc",
            ip=os.path.join(self._sock_dir, "k"),
        )
        try:
            self.km.start_kernel(cwd=self.cwd, env=self.env)
            self._connect()
        except Exception:
            self.close()
            raise

    def _connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=self.startup_timeout)

    def restart(self) -> None:
        """Restart the kernel process (all state is lost); starts it if it never was."""
        if self.km is None:
            return self.start()
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self._connect()

    def is_alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def close(self) -> None:
        """Kill the kernel and remove its sockets and (if we made it) its working directory."""
        if self.km is not None:
            if self.kc is not None:
                self.kc.stop_channels()
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
            self.km = self.kc = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        if self._own_cwd and self.cwd is not None:
            shutil.rmtree(self.cwd, ignore_errors=True)
            self.cwd = None

    def __enter__(self) -> LocalKernelExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running cells --------------------------------------------------------------------
    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Execute one cell; never raises for anything the cell does."""
        self.start()
        timeout = self.timeout if timeout is None else timeout
        t0 = time.monotonic()
        res = ExecutionResult(timeout_s=timeout)
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False)
        idle = self._collect(msg_id, res, deadline=t0 + timeout)
        if not idle and self.km.is_alive():
            # Overran: interrupt (KeyboardInterrupt inside the cell), then give it a moment.
            res.timed_out = True
            self.km.interrupt_kernel()
            idle = self._collect(msg_id, res, deadline=time.monotonic() + self.interrupt_grace)
        if not idle:
            # Dead, or deaf to SIGINT (e.g. stuck in C code): only a restart gets it back.
            if not self.km.is_alive() and not res.timed_out:
                res.error_name, res.error_value = "KernelDied", "the kernel process exited"
            self.restart()
            res.restarted = True
        else:
            self._drain_shell(msg_id)
        if res.timed_out and res.error_name == "KeyboardInterrupt":
            res.error_name = res.error_value = res.traceback = None  # the interrupt was ours
        res.duration_s = time.monotonic() - t0
        return res

    def _collect(self, msg_id: str, res: ExecutionResult, deadline: float) -> bool:
        """Read iopub messages of ``msg_id`` into ``res`` until idle (True) or deadline/death."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                # Short polls so a dead kernel is noticed well before the deadline.
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.km.is_alive():
                    return False
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue  # left over from an earlier, interrupted cell
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    res.stdout += content["text"]
                else:
                    res.stderr += content["text"]
            elif kind == "execute_result":
                res.result = content["data"].get("text/plain")
            elif kind == "display_data":
                text = content["data"].get("text/plain")
                if text is not None:
                    res.display_text.append(text)
            elif kind == "error":
                res.error_name, res.error_value = content["ename"], content["evalue"]
                res.traceback = strip_ansi("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return True

    def _drain_shell(self, msg_id: str) -> None:
        # The execute_reply arrives on the shell channel; consume it so replies don't pile up.
        try:
            while True:
                reply = self.kc.get_shell_msg(timeout=1.0)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return
        except queue.Empty:
            return
