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
import secrets
import time
from typing import Any

from jupyter_client import BlockingKernelClient

from tirforge.executors.config import ExecutorConfig
from tirforge.executors.result import ExecutionResult, strip_ansi

# Arguments for ipykernel: in-memory history (parallel kernels don't lock one sqlite file).
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--HistoryManager.enabled=False"]


def write_connection_file(sock_dir: str) -> tuple[str, dict[str, Any]]:
    """A connection file for ipc transport in ``sock_dir``, always with a random HMAC key."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": os.path.join(sock_dir, "k"),
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }
    path = os.path.join(sock_dir, "kernel.json")
    with open(path, "w") as f:
        json.dump(info, f)
    return path, info


# Kill whatever the cell left running (descendants of the kernel, found through /proc, never
# kill(-1): without a pid namespace that would hit the host), clear the namespace and work dir.
_RESET_CELL = """
import os as _o, shutil as _s, signal as _g
def _descendants(pid):
    found = []
    for tid in _o.listdir(f"/proc/{pid}/task"):
        try:
            kids = open(f"/proc/{pid}/task/{tid}/children").read().split()
        except OSError:
            kids = []
        for kid in map(int, kids):
            found += [kid, *_descendants(kid)]
    return found
for _pid in _descendants(_o.getpid()):
    try:
        _o.kill(_pid, _g.SIGKILL)
    except OSError:
        pass
_o.chdir(WORKDIR)
for _n in _o.listdir("."):
    if _o.path.isdir(_n) and not _o.path.islink(_n):
        _s.rmtree(_n, ignore_errors=True)
    else:
        _o.remove(_n)
def _wipe():
    # InteractiveShell.reset without its full gc.collect() (via displayhook.flush): ~100-230 ms
    # with sympy loaded; a young-generation pass frees the usual garbage in well under 1 ms.
    import gc
    ip = get_ipython()
    ip.history_manager.reset(False)
    ip.user_ns["_oh"].clear()
    ip.displayhook._ = ip.displayhook.__ = ip.displayhook.___ = ""
    ip.last_execution_result = None
    ns = ip.user_global_ns
    for k in [k for k in ns if k not in ("__builtin__", "__builtins__", "__name__")]:
        del ns[k]
    ip.user_ns_hidden.clear()
    ip.init_user_ns()
    gc.collect(1)
_wipe()
"""


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


class KernelExecutor:
    """Base class: one stateful kernel. Subclasses provide the process (see module doc)."""

    #: Where cells start (and what ``reset`` empties); set by the subclass in ``_launch``.
    workdir: str | None = None

    def __init__(self, config: ExecutorConfig | None = None, **overrides: Any):
        self.config = dataclasses.replace(config or ExecutorConfig(), **overrides)
        self.kc: BlockingKernelClient | None = None

    # -- what a backend provides ---------------------------------------------------------
    def _launch(self) -> dict[str, Any]:
        """Start the kernel process; return its connection info."""
        raise NotImplementedError

    def _kill(self) -> None:
        """Stop the kernel process hard, with anything it spawned."""
        raise NotImplementedError

    def _process_alive(self) -> bool:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Release what outlives restarts (work dirs, sockets); called by close."""

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        return self.config.timeout

    def start(self) -> None:
        """Start the kernel and run the preload code; a no-op if already started."""
        if self.kc is not None:
            return
        try:
            self._connect(self._launch())
            self._preload()
        except Exception:
            self.close()
            raise

    def _connect(self, info: dict[str, Any]) -> None:
        kc = BlockingKernelClient()
        kc.load_connection_info(info)
        kc.start_channels()
        self.kc = kc
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
            try:  # iopub is a SUB socket: only once it delivers is it safe to run cells
                self.kc.iopub_channel.get_msg(timeout=0.5)
            except queue.Empty:
                continue
            with contextlib.suppress(queue.Empty):
                while True:  # drop the remaining status messages of the pings
                    self.kc.iopub_channel.get_msg(timeout=0.05)
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

    def restart(self) -> None:
        """Kill and relaunch the kernel: all state is lost, preload runs again."""
        self._disconnect()
        self._kill()
        self._connect(self._launch())
        self._preload()

    def reset(self) -> bool:
        """Forget user state for the next trajectory.

        Fast path (~ms): clear the namespace and the work dir, re-run the (cached) preload.
        A kernel that is dead or does not answer the reset is restarted instead.
        Returns True if it was restarted.
        """
        if self.kc is None:
            self.start()
            return False
        clean = _RESET_CELL.replace("WORKDIR", repr(self.workdir))
        if self.is_alive():
            r = self._run(clean, timeout=5.0, may_restart=False)
            if r.ok:
                self._preload()
                return False
        self.restart()
        return True

    def is_alive(self) -> bool:
        return self.kc is not None and self._process_alive()

    def close(self) -> None:
        """Stop the kernel and remove everything it used. Safe to call twice."""
        self._disconnect()
        try:
            self._kill()
        finally:
            self._cleanup()

    def __enter__(self) -> KernelExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running cells ---------------------------------------------------------------------
    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Execute one cell; never raises for anything the cell does."""
        self.start()
        return self._run(code, self.timeout if timeout is None else timeout, may_restart=True)

    def _run(self, code: str, timeout: float, may_restart: bool) -> ExecutionResult:
        assert self.kc is not None
        t0 = time.monotonic()
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
        if not idle:
            # Dead, or deaf to interrupts (e.g. SIGINT ignored, stuck in C): restart.
            if not res.timed_out:
                res.error_name, res.error_value = "KernelDied", "the kernel process exited"
            if may_restart:
                self.restart()
                res.restarted = True
        else:
            self._drain_shell(msg_id)
        if res.timed_out and res.error_name == "KeyboardInterrupt":
            res.error_name = res.error_value = res.traceback = None  # the interrupt was ours
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
