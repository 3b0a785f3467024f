"""The local backend: an ipykernel subprocess of this interpreter, sandboxed when possible.

Isolation, from strongest to weakest layer:
- bubblewrap (``sandbox="bwrap"``, the default when ``bwrap`` is installed): new user, pid, net,
  ipc and uts namespaces, so no network at all; only the system dirs and this Python's prefix
  are visible (read-only), plus a private /tmp, the work dir and the socket dir; runs as an
  unprivileged uid and dies with its parent.
- setrlimit (always, via ``prlimit``): address space, CPU seconds, file size, and processes
  (the process cap only bites inside bwrap's user namespace).
- a per-kernel temp work dir, and an environment scrubbed of secrets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tirforge.executors.config import ExecutorConfig
from tirforge.executors.kernel import KERNEL_ARGS, KernelExecutor, write_connection_file

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
# One BLAS / OpenMP thread per kernel: many kernels share few cores, and thread pools
# reserve address space that RLIMIT_AS counts.
_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# bwrap --die-with-parent ties the sandbox to the *thread* that forked it (PR_SET_PDEATHSIG):
# a kernel started from a short-lived worker thread would be killed when that thread ends.
# So every kernel is forked from this one thread, which lives as long as the process.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="tirforge-kernel-spawn")


def scrubbed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) minus anything that looks like a secret."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if not any(m in k.upper() for m in _SECRET_MARKERS)}


def make_pids_cgroup(max_pids: int) -> str | None:
    """A fresh cgroup capping the number of processes, or None where we may not make one.

    Root ignores RLIMIT_NPROC (even mapped into a user namespace), so as root a fork bomb is
    only stopped by the pids controller. Non-root users get RLIMIT_NPROC instead.
    """
    if os.geteuid() != 0:
        return None
    name = f"tirforge-{uuid.uuid4().hex[:12]}"
    v1 = "/sys/fs/cgroup/pids"
    try:
        if os.path.isdir(v1):
            path = os.path.join(v1, name)
        else:  # cgroup v2: the controller must be enabled for children of the root
            with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
                f.write("+pids")
            path = os.path.join("/sys/fs/cgroup", name)
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_pids))
        return path
    except OSError:
        return None


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup (daemonised ones too), then remove it."""
    for _ in range(50):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def bwrap_available() -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = subprocess.run(
        ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True
    )
    return probe.returncode == 0


class LocalKernelExecutor(KernelExecutor):
    """Run cells in an ipykernel subprocess of ``sys.executable``."""

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(config, **overrides)
        self._own_cwd = cwd is None  # a temp dir we made is ours to delete
        self.workdir = cwd
        # Model-written code must not see API keys; an explicit env is taken as given.
        self.env = {**(scrubbed_env() if env is None else dict(env)), **_THREAD_ENV}
        mode = self.config.sandbox
        if mode == "auto":
            mode = "bwrap" if bwrap_available() else "none"
        elif mode == "bwrap" and not bwrap_available():
            raise RuntimeError(
                "sandbox='bwrap' but bubblewrap is not usable here: install it "
                "(apt-get install bubblewrap) or use sandbox='none'"
            )
        self.sandbox = mode
        self.proc: subprocess.Popen | None = None
        self._sock_dir: str | None = None
        self._cgroup: str | None = None

    @property
    def cwd(self) -> str | None:
        return self.workdir

    # -- KernelExecutor hooks ----------------------------------------------------------------
    def _launch(self) -> dict[str, Any]:
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="tirforge-kernel-")
        self._sock_dir = tempfile.mkdtemp(prefix="tirforge-ipc-")
        conn_file, info = write_connection_file(self._sock_dir)
        cmd = [*self._limits(), sys.executable, "-m", "ipykernel_launcher", "-f", conn_file]
        cmd += KERNEL_ARGS
        env = dict(self.env)
        if self.sandbox == "bwrap":
            os.chmod(self._sock_dir, 0o700)
            cmd = self._bwrap_prefix() + cmd
            env["HOME"] = self.workdir
        self._cgroup = make_pids_cgroup(self.config.max_processes)
        if self._cgroup is not None:
            # Join the cgroup before exec, so nothing the kernel forks escapes the cap.
            procs = os.path.join(self._cgroup, "cgroup.procs")
            cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
        self.proc = _SPAWNER.submit(
            subprocess.Popen,
            cmd,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # own process group: _kill takes its children too
        ).result()
        return info

    def _limits(self) -> list[str]:
        c = self.config
        mb = 1024 * 1024
        limits = [
            f"--as={c.memory_mb * mb}",
            f"--cpu={c.cpu_seconds}",
            f"--fsize={c.max_file_mb * mb}",
        ]
        if self.sandbox == "bwrap":
            limits.append(f"--nproc={c.max_processes}")
        return ["prlimit", *limits, "--"]

    def _bwrap_prefix(self) -> list[str]:
        ro = {"/usr", sys.base_prefix, sys.prefix}
        args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
        args += ["--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
        # The private /tmp first: binds below may live under /tmp (a venv in /tmp/ci/.venv) and
        # must land on top of it, not be hidden by it.
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for path in sorted(ro):
            args += ["--ro-bind", path, path]
        for link in ("bin", "lib", "lib64", "sbin"):
            target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
            if target is not None:  # merged-/usr systems: /lib -> usr/lib
                args += ["--symlink", target, f"/{link}"]
            elif os.path.isdir(f"/{link}"):
                args += ["--ro-bind", f"/{link}", f"/{link}"]
        for f in ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf"):
            if os.path.exists(f):
                args += ["--ro-bind", f, f]
        args += ["--bind", self.workdir, self.workdir, "--bind", self._sock_dir, self._sock_dir]
        args += ["--remount-ro", "/", "--chdir", self.workdir, "--"]
        return args

    def _kill(self) -> None:
        if self._cgroup is not None:
            kill_cgroup(self._cgroup)
            self._cgroup = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def _process_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _cleanup(self) -> None:
        if self._own_cwd and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
