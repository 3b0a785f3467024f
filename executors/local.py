"""The local backend: a fork server and its kernels in bubblewrap, under cgroup limits.

Isolation, from strongest to weakest layer:
- bubblewrap (``sandbox="bwrap"``, the default; ``auto`` refuses to run without it): new
  user, pid, net, ipc and uts namespaces, so no network at all; only the system dirs and this
  Python's prefix are visible (read-only), plus a sized private /tmp, a sized tmpfs work dir and
  the socket dir; runs as an unprivileged uid and dies with its parent.
- a cgroup per executor (when root; v1 or v2): memory and process caps for the whole tree --
  fork server, kernel and everything they start. Without root there is none: the caps below
  are per process only.
- setrlimit (always, via ``prlimit``): address space, CPU seconds, file size, and processes
  (the process cap only inside bwrap's user namespace).
- an environment built from an allowlist, not the host's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tirforge.executors.config import ExecutorConfig
from tirforge.executors.kernel import KernelExecutor
from tirforge.executors.result import SandboxUnavailable
from tirforge.executors.tempdirs import owned_temp_dir

#: Host variables a kernel may see (values copied when set); everything else is dropped, so no
#: secret reaches model code whatever it is called. Source: the Docker backend's fixed env.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
# One BLAS / OpenMP thread per kernel: many kernels share few cores, and thread pools
# reserve address space that RLIMIT_AS counts.
_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TMP_MB = 64  # size of the private /tmp (as the Docker backend's)
FORKS_DIR = "/forks"  # inside bwrap: a tmpfs holding one work dir per fork of the kernel
# bwrap --die-with-parent ties the sandbox to the *thread* that forked it (PR_SET_PDEATHSIG):
# a kernel started from a short-lived worker thread would be killed when that thread ends.
# So every kernel is forked from this one thread, which lives as long as the process.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="tirforge-kernel-spawn")
NO_BWRAP_HELP = (
    "the local sandbox needs bubblewrap, which is not usable here. Install it "
    "(`apt-get install bubblewrap`, or `make setup` as root), or use the Docker backend "
    "(--executor docker), or run model code unsandboxed on purpose with --sandbox none"
)


def allowed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``ENV_ALLOWLIST`` part of ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in ENV_ALLOWLIST if k in env}


def scrubbed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Kept for callers of the old name: the allowlisted environment."""
    return allowed_env(env)


class KernelCgroup:
    """One cgroup (v1: one per controller hierarchy; v2: one dir) capping memory and processes
    of a whole sandbox. ``create`` returns None where we may not make one (not root, no
    controllers): then only the per-process rlimits hold.

    Root ignores RLIMIT_NPROC (even mapped into a user namespace), so as root a fork bomb is
    only stopped by the pids controller; and RLIMIT_AS is per process, so only the memory
    controller caps a kernel that forks.
    """

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs  # controller -> cgroup dir ("memory", "pids"; v2: both the same dir)

    @classmethod
    def create(cls, memory_mb: int, max_pids: int) -> KernelCgroup | None:
        if os.geteuid() != 0:
            return None
        name = f"tirforge-{uuid.uuid4().hex[:12]}"
        v2 = "/sys/fs/cgroup/cgroup.controllers"
        dirs: dict[str, str] = {}
        try:
            if os.path.exists(v2):
                with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
                    f.write("+pids +memory")
                path = os.path.join("/sys/fs/cgroup", name)
                os.mkdir(path)
                dirs = {"memory": path, "pids": path}
                _write(path, "memory.max", str(memory_mb * 2**20))
                with contextlib.suppress(OSError):
                    _write(path, "memory.swap.max", "0")
                _write(path, "pids.max", str(max_pids))
            else:
                for ctrl in ("memory", "pids"):
                    root = f"/sys/fs/cgroup/{ctrl}"
                    if os.path.isdir(root):
                        dirs[ctrl] = os.path.join(root, name)
                        os.mkdir(dirs[ctrl])
                if "memory" in dirs:
                    _write(dirs["memory"], "memory.limit_in_bytes", str(memory_mb * 2**20))
                    with contextlib.suppress(OSError):  # only with swap accounting
                        _write(dirs["memory"], "memory.memsw.limit_in_bytes",
                               str(memory_mb * 2**20))
                if "pids" in dirs:
                    _write(dirs["pids"], "pids.max", str(max_pids))
        except OSError:
            cls(dirs).remove()
            return None
        return cls(dirs) if dirs else None

    def scale(self, memory_mb: int, max_pids: int) -> None:
        """New caps for the whole cgroup (a kernel and its forks share it)."""
        with contextlib.suppress(OSError):
            if "memory" in self.dirs:
                mem = str(memory_mb * 2**20)
                v2 = os.path.exists(os.path.join(self.dirs["memory"], "memory.max"))
                if v2:
                    _write(self.dirs["memory"], "memory.max", mem)
                else:  # v1: memsw may not be below the limit, so raise it first
                    with contextlib.suppress(OSError):
                        _write(self.dirs["memory"], "memory.memsw.limit_in_bytes", mem)
                    _write(self.dirs["memory"], "memory.limit_in_bytes", mem)
            if "pids" in self.dirs:
                _write(self.dirs["pids"], "pids.max", str(max_pids))

    def join_prefix(self) -> list[str]:
        """A command prefix that moves the process into the cgroup before exec."""
        procs = " ".join(os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values())))
        return ["sh", "-c", f'for f in {procs}; do echo $$ > $f || exit 1; done; exec "$@"', "sh"]

    def oom_kills(self) -> int | None:
        d = self.dirs.get("memory")
        for name in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(d or "/nonexistent", name)) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
        return None

    def remove(self, reap: Callable[[], object] = lambda: None) -> None:
        """SIGKILL every process in it (daemonised ones too), ``reap()`` our own child among
        them (a zombie keeps the cgroup busy), then remove it."""
        paths = sorted(set(self.dirs.values()))
        for path in paths:
            for _ in range(100):
                try:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        pids = [int(p) for p in f.read().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
        reap()
        for path in paths:
            for _ in range(100):  # rmdir fails (EBUSY) until the last task has gone
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def bwrap_available() -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = subprocess.run(
        ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True
    )
    return probe.returncode == 0


class LocalKernelExecutor(KernelExecutor):
    """Run cells in ipykernels forked from a template of ``sys.executable`` (see module doc).

    ``cwd``: a host dir to run in (bound into the sandbox, kept at close); default a private
    tmpfs work dir of ``max_file_mb``. ``env``: extra variables for the kernel, taken as given
    (default: the allowlisted host environment). Raises RuntimeError when the sandbox asked for
    (``bwrap``, or ``auto``) is not usable, saying how to get it.
    """

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
        self.env = {**(allowed_env() if env is None else dict(env)), **_THREAD_ENV}
        mode = self.config.sandbox
        if mode in ("auto", "bwrap") and not bwrap_available():
            # Fail closed: never run model code unsandboxed unless asked to by name.
            raise SandboxUnavailable(f"sandbox={mode!r}: {NO_BWRAP_HELP}")
        self.sandbox = "bwrap" if mode == "auto" else mode
        self.proc: subprocess.Popen | None = None
        self._cgroup: KernelCgroup | None = None
        self._forks_on_host = False  # without bwrap, forks' work dirs are a host temp dir

    @property
    def cwd(self) -> str | None:
        return self.workdir

    # -- KernelExecutor hooks ----------------------------------------------------------------
    def _launch(self) -> None:
        if self.workdir is None:
            self.workdir = owned_temp_dir("tirforge-kernel-")  # pid-named: see tempdirs
        self._cgroup = KernelCgroup.create(self.config.memory_mb, self.config.max_processes)
        # The socket dir is the one host dir a cell can write to (inside bwrap the sandbox uid
        # maps to ours, so no chmod closes it). On /dev/shm its files are memory charged to
        # the kernel's memory cgroup: bounded by memory_mb, never host disk.
        shm = "/dev/shm" if self._cgroup and "memory" in self._cgroup.dirs else None
        self._sock_dir = owned_temp_dir("tirforge-ipc-", shm)
        os.chmod(self._sock_dir, 0o700)
        # Forks' work dirs: a sized tmpfs inside bwrap; a host temp dir without it.
        self._forks_on_host = self.sandbox != "bwrap"
        self._forks_dir = (owned_temp_dir("tirforge-forks-") if self._forks_on_host
                           else FORKS_DIR)
        env = {**self.env, "PYTHONDONTWRITEBYTECODE": "1"}
        env.setdefault("PATH", os.defpath)
        if self.sandbox == "bwrap":
            env.update(HOME=self.workdir, IPYTHONDIR="/tmp/.ipython", MPLCONFIGDIR="/tmp/.mpl")
        else:  # no private /tmp: IPython's profile goes next to the sockets, out of the work dir
            env.update(HOME=self.workdir, IPYTHONDIR=os.path.join(self._sock_dir, "ipython"))
        cmd = [*self._limits(), *self.server_command(sys.executable)]
        if self.sandbox == "bwrap":
            cmd = self._bwrap_prefix() + cmd
        if self._cgroup is not None:
            # Join the cgroup before exec, so nothing the kernel forks escapes the caps.
            cmd = self._cgroup.join_prefix() + cmd
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
        assert self.workdir is not None and self._sock_dir is not None
        ro = {"/usr", sys.base_prefix, sys.prefix}
        args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
        args += ["--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
        # The private /tmp first: binds below may live under /tmp (a venv in /tmp/ci/.venv) and
        # must land on top of it, not be hidden by it. Sized, so files cannot fill host memory.
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_MB * 2**20)]
        args += ["--tmpfs", "/tmp"]
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
        if self._own_cwd:  # our work dir: a sized tmpfs at its path, nothing reaches the host
            args += ["--size", str(self.config.max_file_mb * 2**20), "--tmpfs", self.workdir]
        else:  # the caller's dir: theirs to see
            args += ["--bind", self.workdir, self.workdir]
        args += ["--bind", self._sock_dir, self._sock_dir]
        args += ["--size", str(self.config.max_file_mb * 2**20), "--tmpfs", FORKS_DIR]
        args += ["--remount-ro", "/", "--chdir", self.workdir, "--"]
        return args

    def _wipe_dirs(self) -> list[str]:
        assert self.workdir is not None
        return [self.workdir, "/tmp"] if self.sandbox == "bwrap" else [self.workdir]

    def _private_pids(self) -> bool:
        return self.sandbox == "bwrap"

    def _oom_kills(self, status: dict[str, Any]) -> int | None:
        return self._cgroup.oom_kills() if self._cgroup is not None else None

    def _kill(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove(reap=self._reap)
            self._cgroup = None
        self._reap()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        if self._forks_on_host and self._forks_dir is not None:
            shutil.rmtree(self._forks_dir, ignore_errors=True)
        self._forks_dir = None

    def _detach(self) -> None:
        super()._detach()
        self.proc, self._cgroup = None, None
        if self._slot != 0:  # a fork's work dir was its parent sandbox's: take a new one
            self.workdir, self._own_cwd = None, True

    def _scale_caps(self, kernels: int) -> None:
        if self._cgroup is not None:
            self._cgroup.scale(self.config.memory_mb * kernels, self.config.max_processes * kernels)

    def _adopt_fork(self, child: KernelExecutor) -> None:
        assert isinstance(child, LocalKernelExecutor)
        child._own_cwd = False  # inside the sandbox (or the forks dir): not ours to delete

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def _sandbox_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _cleanup(self) -> None:
        if self._own_cwd and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
