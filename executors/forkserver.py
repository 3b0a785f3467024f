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

- ``{"op": "spawn", "slot": n, "conn": path, "wipe": bool, "workdir": dir}``: kill everything
  in the sandbox (and, if ``wipe``, empty the ``cfg["wipe"]`` dirs and ``cfg["forks"]``), then
  fork a kernel for ``slot`` (0: the sandbox's own kernel) working in ``workdir`` and reading
  its connection file at ``path``. Reply ``{"pid": n}``. The host spawns only when no other
  slot of the sandbox is in use.
- ``{"op": "adopt", "slot": n, "pid": p, "workdir": dir}``: ``p`` is a fork of a live kernel
  (``_tirforge_fork.fork`` below; it is this process's child once its middle process exited):
  serve it as ``slot``. ``{"pid": p}``.
- ``{"op": "kill", "slot": n}``: kill that slot's kernel with its process tree and every
  process no slot owns (daemons reparented here), and empty its work dir. ``{"killed": n}``.
- ``{"op": "status", "slot": n}``: ``{"alive": bool, "signal": n|null, "code": n|null,
  "oom_kills": n|null}`` (how the slot's kernel ended, and the OOM-kill counter of the cgroup if
  this process can read it).
- ``{"op": "clean"}``: kill every descendant and wipe ``cfg["wipe"]`` dirs. ``{"killed": n}``.

Forks: every kernel registers a module ``_tirforge_fork`` whose ``fork(conn, src, dst)``, run by
the host as a silent cell, copies the work dir ``src`` to ``dst``, then ``os.fork()``s twice (the
middle process exits, so the fork is reparented to this subreaper and outlives its parent); the
fork drops the parent's kernel server without touching it (no ZMQ object of the parent is used
after the fork), builds a new one on the connection file ``conn`` around the *same* IPython
shell (namespace, modules, execution count), and serves it on a new asyncio loop.

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


def _descendants(pid, stop=()):
    """Every process below ``pid``, not entering the subtrees of the pids in ``stop``."""
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
            if kid not in stop:
                found += [kid, *_descendants(kid, stop)]
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
        self.kernels = {}  # slot -> pid of its kernel
        self.workdirs = {}  # slot -> its work dir
        self.ended = {}  # pid -> wait status, once reaped (any child of this process)

    def reap(self):
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if len(self.ended) > 256:  # statuses of long-gone processes
                for old in [p for p in self.ended if p not in self.kernels.values()][:128]:
                    del self.ended[old]
            self.ended[pid] = st

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
        self.kernels.clear()
        keep = [os.path.dirname(self.cfg["ctl"]), *self.cfg.get("wipe", [])]
        dirs = [*self.cfg.get("wipe", []), self.cfg.get("forks")] if wipe else []
        for path in dirs:
            if path:
                _wipe(path, keep)
        return {"killed": killed}

    def kill(self, slot):
        """Kill one slot's kernel tree and every process no slot owns; others live on."""
        pid = self.kernels.pop(slot, None)
        owned = set(self.kernels.values())
        killed = 0
        for _ in range(200):
            roots = [pid] if pid is not None else []
            roots += [c for c in _children(os.getpid()) if c not in owned and c != pid]
            pids = [p for r in roots for p in (r, *_descendants(r, owned))]
            pids = [p for p in pids if p not in owned and p not in self.ended]
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            self.reap()
            if not pids:
                break
            killed += len(pids)
            time.sleep(0.002)
        workdir = self.workdirs.pop(slot, None)
        if workdir:
            keep = [os.path.dirname(self.cfg["ctl"]), self.cfg.get("forks") or ""]
            _wipe(workdir, keep)
            if slot != 0:
                shutil.rmtree(workdir, ignore_errors=True)
        return {"killed": killed}

    def status(self, slot=0):
        self.reap()
        pid = self.kernels.get(slot)
        st = self.ended.get(pid) if pid is not None else None
        alive = pid is not None and st is None
        return {
            "alive": alive,
            "signal": os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else None,
            "code": os.WEXITSTATUS(st) if st is not None and os.WIFEXITED(st) else None,
            "oom_kills": _oom_kills(),
        }

    def spawn(self, conn_file, wipe, ctl_fds, slot=0, workdir=None):
        self.clean(wipe)
        workdir = workdir or self.cfg["workdir"]
        os.makedirs(workdir, exist_ok=True)
        pid = os.fork()
        if pid == 0:
            try:
                for fd in ctl_fds:
                    os.close(fd)
                _become_kernel(self.cfg, conn_file, self.libc, workdir)
            finally:
                os._exit(70)
        self.kernels[slot], self.workdirs[slot] = pid, workdir
        return {"pid": pid}

    def adopt(self, slot, pid, workdir):
        self.reap()
        if pid not in _descendants(os.getpid()) and pid not in self.ended:
            raise RuntimeError(f"process {pid} is not a kernel of this sandbox")
        self.kernels[slot], self.workdirs[slot] = pid, workdir
        return {"pid": pid}


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(k) for k in f.read().split()]
    except OSError:
        return []


def _become_kernel(cfg, conn_file, libc, workdir):
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
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(["-f", conn_file, *cfg["kernel_args"]])
    _cap_output(app, cfg["max_output_chars"])
    _FORK.update(cfg=cfg, app=app, caps=_cap_streams(app, cfg["max_output_chars"]))
    _register_fork()
    app.start()


# -- forking a live kernel -------------------------------------------------------------------
_FORK = {"keep": []}  # the kernel's app, its stream caps, and (in a fork) its parents' apps


def _register_fork():
    import types

    mod = types.ModuleType("_tirforge_fork")
    mod.fork, mod.pid = _fork_kernel, None
    sys.modules["_tirforge_fork"] = mod


def _fork_kernel(conn_file, src, dst):
    """Run in the kernel (a silent cell): copy ``src`` to ``dst``, fork twice, record the
    fork's pid in ``_tirforge_fork.pid``. The fork serves ``conn_file``; this kernel goes on.

    Nothing needs flushing first: the kernel flushed its streams when the last cell ended, and
    the fork never flushes the streams it inherits."""
    if os.path.realpath(src) != os.path.realpath(dst):
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    cwd = os.getcwd()
    rel = os.path.relpath(cwd, src)
    cwd = dst if rel == "." else os.path.join(dst, rel) if not rel.startswith("..") else cwd
    for pid in _FORK.pop("middle", []):  # middle processes of earlier forks
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    # The random module reseeds its global generator in every child (os.register_at_fork):
    # a fork carries the parent's draws, so its state is put back in the fork.
    rnd = sys.modules.get("random")
    rnd_state = rnd.getstate() if rnd is not None else None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            grandchild = os.fork()
            if grandchild:
                os.write(w, str(grandchild).encode())
                os.close(w)
                os._exit(0)
            os.close(w)
            _FORK["random"] = rnd_state
            _remap_files(src, dst)
            _serve_fork(conn_file, dst, cwd)
        finally:
            os._exit(70)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):  # EOF once the middle process wrote and exited
        data += chunk
    os.close(r)
    try:  # reaped now if it has already gone, else at the next fork
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            _FORK.setdefault("middle", []).append(pid)
    except ChildProcessError:
        pass
    if not data:
        raise RuntimeError("the fork did not start")
    sys.modules["_tirforge_fork"].pid = int(data)


def _remap_files(src, dst):
    """In the fork: files the parent has open under ``src`` are reopened on the fork's copies
    (same fd, flags and offset), so that writing through an inherited handle changes the
    fork's file, not the parent's."""
    src = os.path.realpath(src)
    if src == os.path.realpath(dst):
        return
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not path.startswith(src + "/"):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
            flags = int(info["flags"].strip(), 8) & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
            new = os.open(dst + path[len(src):], flags)
            os.lseek(new, int(info["pos"].strip()), os.SEEK_SET)
            os.dup2(new, fd, inheritable=os.get_inheritable(fd))
            os.close(new)
        except (OSError, ValueError, KeyError):
            continue  # a pipe, a deleted file, one that went away: left shared


def _serve_fork(conn_file, workdir, cwd):
    """In the fork: a new kernel server around the inherited shell, on a new event loop."""
    import asyncio

    from ipykernel.kernelapp import IPKernelApp

    os.setsid()
    os.chdir(cwd)
    os.environ["HOME"] = workdir
    # fds 1 and 2 are the parent's capture pipes: what the fork writes there (its logger, C
    # code) would show up in the parent's output. The fork's own streams capture them anew.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    # Leave the parent's loop (we are inside one of its callbacks) without touching it: its
    # selector's epoll set is shared with the parent.
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(asyncio.new_event_loop())
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # not the parent's ZMQ streams
    sys.displayhook = sys.__displayhook__
    old = _FORK["app"]
    shell = old.shell
    for cap in _FORK["caps"]:
        shell.events.unregister("pre_run_cell", cap.reset)
        shell.events.unregister("post_run_cell", cap.flush_tail)
    _FORK["keep"].append((old, old.kernel, _FORK["caps"]))  # never collected: no ZMQ close
    IPKernelApp.clear_instance()
    type(old.kernel).clear_instance()
    # Only the transport is new: the steps of IPKernelApp.initialize that make sockets,
    # streams and the kernel object. Config, profile, pdb, sys.path, extensions and startup
    # code were set up by the first kernel and are part of the state a fork carries.
    app = IPKernelApp.instance(config=old.config)
    app.profile_dir = old.profile_dir
    app.connection_file = conn_file
    app.init_connection_file()
    app.init_sockets()
    app.init_heartbeat()
    app.init_io()
    app.init_signal()
    app.init_kernel()
    app.init_shell()
    if app.kernel.shell is not shell:
        raise RuntimeError("ipykernel made a new shell for the fork")
    shell.kernel = app.kernel
    # The parent's cell never ends here, so its display trap stays set: results go through
    # the shell's hook (as in any cell), not the app's.
    sys.displayhook = shell.displayhook
    _FORK.update(app=app, caps=_cap_streams(app, _FORK["cfg"]["max_output_chars"]))
    if _FORK.get("random") is not None:  # last: setting up the server may draw from it
        sys.modules["random"].setstate(_FORK.pop("random"))
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


def _cap_streams(app, cap):
    """Cap the kernel's stdout / stderr streams per cell; returns the caps (a fork replaces
    them with caps on its own streams)."""
    shell = app.shell
    caps = []
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        capped = _StreamCap(stream, cap)
        stream.write = capped.write
        shell.events.register("pre_run_cell", capped.reset)
        shell.events.register("post_run_cell", capped.flush_tail)
        caps.append(capped)
    return caps


def _cap_output(app, cap):
    """Cap rich results and displays (once per shell: a fork keeps its parent's)."""
    shell = app.shell
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
                reply = server.spawn(req["conn"], req.get("wipe", True), (conn.fileno(),),
                                     req.get("slot", 0), req.get("workdir"))
            elif op == "adopt":
                reply = server.adopt(req["slot"], req["pid"], req["workdir"])
            elif op == "kill":
                reply = server.kill(req["slot"])
            elif op == "status":
                reply = server.status(req.get("slot", 0))
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
