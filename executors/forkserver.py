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

Forks (``forkserver_kernel.py``): every kernel registers a module ``_tirforge_fork`` whose
``fork(conn, src, dst)``, run by the host as a silent cell, copies the work dir ``src`` to
``dst``, then ``os.fork()``s twice (the middle process exits, so the fork is reparented to this
subreaper and outlives its parent); the fork drops the parent's kernel server without touching
it (no ZMQ object of the parent is used after the fork), builds a new one on the connection
file ``conn`` around the *same* IPython shell (namespace, modules, execution count), and serves
it on a new asyncio loop.

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

    def kill_until_gone(self, targets):
        """SIGKILL what `targets()` lists until it lists nothing (children fork while dying);
        returns how many kills were sent. Bounded: 200 rounds, 2 ms apart."""
        killed = 0
        for _ in range(200):
            pids = targets()
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
        return killed

    def clean(self, wipe=True):
        def everything():
            if self.cfg.get("pidns"):  # pid 1 of its own namespace: -1 reaches them all
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError:
                    pass
            return _descendants(os.getpid())

        killed = self.kill_until_gone(everything)
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
        def unowned():
            roots = [pid] if pid is not None else []
            roots += [c for c in _children(os.getpid()) if c not in owned and c != pid]
            pids = [p for r in roots for p in (r, *_descendants(r, owned))]
            return [p for p in pids if p not in owned and p not in self.ended]

        killed = self.kill_until_gone(unowned)
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
                # Defined in forkserver_kernel.py, which precedes this file in the source.
                _become_kernel(self.cfg, conn_file, self.libc, workdir)  # noqa: F821
            finally:
                os._exit(70)
        self.kernels[slot], self.workdirs[slot] = pid, workdir
        return {"pid": pid}

    def adopt(self, slot, pid, workdir):
        # While its middle process exits, the fork moves from its children to ours: a /proc walk
        # can miss it for that moment, so look again briefly before saying no.
        for _ in range(100):
            self.reap()
            if pid in self.ended or pid in _descendants(os.getpid()):
                break
            time.sleep(0.002)
        else:
            raise RuntimeError(f"process {pid} is not a kernel of this sandbox")
        self.kernels[slot], self.workdirs[slot] = pid, workdir
        return {"pid": pid}


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(k) for k in f.read().split()]
    except OSError:
        return []


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
