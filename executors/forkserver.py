"""The fork server: a warm template inside the sandbox that forks one fresh kernel per lease.

This file is *source*, not an imported module: the backends run it as ``python -c <this file>
<json config>`` as the sandbox's main process (bubblewrap or the container), so the sandbox
image needs nothing of tirforge. It uses only the standard library and ipykernel.

Why: reusing one interpreter across trajectories leaks state no namespace clear can reach
(monkeypatched builtins, ``math.pi = 3``, ``sys.modules``, ``os.environ``, daemons, threads,
zombies). A fresh interpreter costs a ~1.3 s cold start; a fork of this pre-imported template
costs tens of milliseconds, and the pool does it in the background after each return.

Protocol: the host connects once to the unix socket ``cfg["ctl"]`` (the listener is closed
after that one connection, so no cell can connect later) and sends one JSON object per line;
each gets one JSON reply line:

- ``{"op": "spawn", "conn": path, "wipe": bool}``: kill everything of the previous kernel
  (and, if ``wipe``, empty the ``cfg["wipe"]`` dirs), then fork a kernel reading its
  connection file at ``path``. Reply ``{"pid": n}``.
- ``{"op": "status"}``: ``{"alive": bool, "signal": n|null, "code": n|null, "oom_kills": n|null}``
  (how the kernel ended, and the OOM-kill counter of the cgroup if this process can read it).
- ``{"op": "clean"}``: kill every descendant and wipe ``cfg["wipe"]`` dirs. ``{"killed": n}``.

Killing "everything": this process is a child subreaper (PR_SET_CHILD_SUBREAPER), so
double-forked daemons reparent to it rather than escaping to init; it kills every descendant
found under /proc, and in a private PID namespace (``cfg["pidns"]``) also ``kill(-1)``, which
reaches every process of the namespace except init and the caller. It is not dumpable, so a
kernel (same uid) cannot ptrace it or write its memory; a kernel *can* kill it, which the host
sees as a dead control socket and answers with a full sandbox restart.
"""

import ctypes
import gc
import json
import os
import shutil
import signal
import socket
import sys
import time

PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
_WARM_MODULES = (
    "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.debugger",
    "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.oinspect",
    "IPython.extensions.storemagic", "IPython.utils.wildcard", "pdb", "faulthandler",
    "tornado.platform.asyncio",
)


def _descendants(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for kid in kids:
            found += [kid, *_descendants(kid)]
    return found


def _oom_kills():
    """The OOM-kill counter of this cgroup (v2 memory.events, v1 memory.oom_control)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _wipe(path, keep):
    """Empty ``path``, except entries holding one of the ``keep`` paths (the socket dir and
    work dir may be mounted below /tmp)."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        p = os.path.join(path, name)
        if any(k == p or k.startswith(p + "/") for k in keep):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.remove(p)
            except OSError:
                pass


class Server:
    def __init__(self, cfg, libc):
        self.cfg, self.libc = cfg, libc
        self.kernel = None  # pid of the current kernel
        self.ended = None  # its wait status once reaped

    def reap(self):
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.kernel:
                self.ended = st

    def clean(self, wipe=True):
        killed = 0
        for _ in range(200):
            pids = _descendants(os.getpid())
            if self.cfg.get("pidns"):
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.reap()
            if not pids:
                break
            killed += len(pids)
            time.sleep(0.002)
        self.kernel = None
        keep = [os.path.dirname(self.cfg["ctl"]), *self.cfg.get("wipe", [])]
        for path in self.cfg.get("wipe", []) if wipe else []:
            _wipe(path, keep)
        return {"killed": killed}

    def status(self):
        self.reap()
        st = self.ended
        alive = self.kernel is not None and st is None
        return {
            "alive": alive,
            "signal": os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else None,
            "code": os.WEXITSTATUS(st) if st is not None and os.WIFEXITED(st) else None,
            "oom_kills": _oom_kills(),
        }

    def spawn(self, conn_file, wipe, ctl_fds):
        self.clean(wipe)
        self.ended = None
        pid = os.fork()
        if pid == 0:
            try:
                for fd in ctl_fds:
                    os.close(fd)
                _become_kernel(self.cfg, conn_file, self.libc)
            finally:
                os._exit(70)
        self.kernel = pid
        return {"pid": pid}


def _become_kernel(cfg, conn_file, libc):
    os.setsid()  # own process group: a cell's killpg(0) does not reach the server
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # under memory pressure the OOM killer takes a kernel, not the template
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    gc.unfreeze()
    os.chdir(cfg["workdir"])
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(["-f", conn_file, *cfg["kernel_args"]])
    _cap_output(app, cfg["max_output_chars"])
    app.start()


class _StreamCap:
    """Per cell: pass the first ``cap`` characters through, keep only the last ``cap // 2``
    of the rest in memory, and write them with a marker when the cell ends. A flood is cut
    where it is produced, so neither the kernel nor the host ever holds it."""

    def __init__(self, stream, cap):
        self.stream, self.write_through = stream, stream.write
        self.cap, self.half = cap, max(cap // 2, 1)
        self.reset()

    def reset(self, *args):
        self.passed, self.dropped, self.tail = 0, 0, ""

    def write(self, text):
        if not isinstance(text, str):
            return self.write_through(text)
        n = len(text)
        if self.passed < self.cap:
            take = text[: self.cap - self.passed]
            self.passed += len(take)
            self.write_through(take)
            text = text[len(take) :]
        if text:
            self.tail = (self.tail + text[-self.half :])[-self.half :]
            self.dropped += len(text)
        return n

    def flush_tail(self, *args):
        if self.dropped:
            kept = len(self.tail)
            self.write_through(f"\n...[truncated {self.dropped - kept} chars]...\n{self.tail}")
        self.reset()


def _cap_text(data, cap):
    text = data.get("text/plain") if isinstance(data, dict) else None
    if isinstance(text, str) and len(text) > cap:
        half = cap // 2
        data = {**data, "text/plain": f"{text[:half]}\n...[truncated {len(text) - 2 * half} "
                f"chars]...\n{text[-half:]}"}
    return data


def _cap_output(app, cap):
    shell = app.shell
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        capped = _StreamCap(stream, cap)
        stream.write = capped.write
        shell.events.register("pre_run_cell", capped.reset)
        shell.events.register("post_run_cell", capped.flush_tail)
    publish = shell.display_pub.publish
    shell.display_pub.publish = lambda data, *a, **kw: publish(_cap_text(data, cap), *a, **kw)
    hook = shell.displayhook
    write_format = hook.write_format_data
    hook.write_format_data = lambda data, *a, **kw: write_format(_cap_text(data, cap), *a, **kw)


def main():
    cfg = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Warm the template: everything a kernel imports while it initialises (measured: the
    # debugger's debugpy alone is ~60 % of a fork's start), plus the preload's imports.
    import importlib

    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an older or leaner ipykernel/IPython: it imports what it needs
            pass

    exec(cfg.get("preload") or "", {})
    gc.collect()
    gc.freeze()  # keep the template's objects out of the children's collections: fewer COW copies
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(cfg["ctl"])
    srv.listen(1)
    conn, _ = srv.accept()
    srv.close()
    os.unlink(cfg["ctl"])
    server = Server(cfg, libc)
    rfile = conn.makefile("rb")
    for line in rfile:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "spawn":
                reply = server.spawn(req["conn"], req.get("wipe", True), (conn.fileno(),))
            elif op == "status":
                reply = server.status()
            elif op == "clean":
                reply = server.clean()
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # report, keep serving
            reply = {"error": f"{type(e).__name__}: {e}"}
        conn.sendall(json.dumps(reply).encode() + b"\n")
    server.clean()


if __name__ == "__main__":
    main()
