"""The kernel's half of the fork server's source: per-cell output caps and the fork op.

Like ``forkserver.py`` this is *source*, not an imported module: ``control.FORKSERVER_SOURCE``
is this file followed by ``forkserver.py``, run as ``python -c`` inside the sandbox (standard
library and ipykernel only). Everything here runs in a kernel process, never in the server.
"""

import gc
import os
import shutil
import signal
import sys

_DUMPABLE, _NO_SUBREAPER = 4, 36  # prctl options (PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER)

def _become_kernel(cfg, conn_file, libc, workdir):
    os.setsid()  # own process group: a cell's killpg(0) does not reach the server
    libc.prctl(_DUMPABLE, 1, 0, 0, 0)
    libc.prctl(_NO_SUBREAPER, 0, 0, 0, 0)
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
                os.write(w, f"{grandchild}\n".encode())
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
    while not data.endswith(b"\n") and (chunk := os.read(r, 64)):  # a line, or EOF (failed)
        data += chunk
    os.close(r)
    try:  # reaped now if it has already gone, else at the next fork
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            _FORK.setdefault("middle", []).append(pid)
    except ChildProcessError:
        pass
    if not data.endswith(b"\n"):
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
    # Everything of the parent's server stays referenced, never collected: no ZMQ object of it
    # is closed (or otherwise used) here.
    _FORK["keep"].append((dict(old._trait_values), old.kernel, _FORK["caps"]))
    type(old.kernel).clear_instance()
    # No debugger in a fork (~20 ms of its start; nothing here debugs): ipykernel 7 reads the
    # flag from ipykernel.debugger when a kernel is made, 6 from ipykernel.ipkernel.
    for name in ("ipykernel.debugger", "ipykernel.ipkernel"):
        if hasattr(sys.modules.get(name), "_is_debugpy_available"):
            sys.modules[name]._is_debugpy_available = False
    # The same app object, with a new transport: the steps of IPKernelApp.initialize that make
    # the connection, sockets, streams and the kernel object (a new Application costs more
    # than all of them). Config, profile, pdb, sys.path, extensions and startup code were set
    # up by the first kernel and are part of the state a fork carries.
    app = old
    app.context = app.heartbeat = app.iopub_thread = None
    # A new session too: jupyter_client's refuses to send from another pid than its own.
    app.session = type(old.session)(parent=app)
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
