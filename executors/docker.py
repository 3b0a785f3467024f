"""The Docker backend: kernels are forked by a fork server in a locked-down container.

The container's main process is the fork server (``forkserver.py``, passed as ``python3 -c``:
the image needs nothing of tirforge); each reset kills the previous kernel with everything it
left in the container and forks a fresh one, so a container serves many trajectories without
carrying anything from one to the next, and without a container start per lease.

The container gets no network (``network_mode="none"``), a read-only root filesystem, an
unprivileged uid, no capabilities, ``no-new-privileges``, cgroup limits on memory, processes
and CPU, and two small tmpfs mounts (``/work`` for the cell's files, ``/tmp``). Its
environment holds nothing from the host. The kernel talks to us over ZMQ ``ipc`` sockets in a
private directory bind-mounted at the same path inside and out, signed with a random HMAC key.
Once a kernel answers, the key file is deleted and the directory taken back from it, so the
one host-backed mount is closed to cells (it is reopened only while the next kernel starts,
when no cell runs). Interrupts travel as Jupyter messages, so no signal
ever has to cross the container boundary.

Containers are labelled with the owning process (pid and start time). ``close`` removes a
kernel's container, an ``atexit`` hook closes kernels nobody closed, and ``reap_orphans`` -- run
once per process when the first docker kernel starts -- removes containers whose owner died
without either (``kill -9``, a crash).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import threading
import uuid
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import LogConfig, Ulimit

from tirforge.executors.config import ExecutorConfig
from tirforge.executors.kernel import KernelExecutor
from tirforge.executors.result import SandboxUnavailable
from tirforge.executors.sandbox_image import docker_client
from tirforge.executors.tempdirs import owned_temp_dir

LABEL = "tirforge.executor"
FORKS_DIR = "/forks"  # a tmpfs in the container holding one work dir per fork
# Numeric, so the image needs no passwd entry; Debian and python:*-slim call it nobody.
SANDBOX_UID = 65534
_SOCK_PREFIX = "tirforge-ipc-"
_CONTAINER_ENV = {
    "HOME": "/work",
    # IPython's profile dir and the like go to /tmp, so a fresh /work is empty.
    "IPYTHONDIR": "/tmp/.ipython",
    "MPLCONFIGDIR": "/tmp/.matplotlib",
    "PYTHONDONTWRITEBYTECODE": "1",
    # One BLAS / OpenMP thread per kernel, like the local backend.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process.

    Stored with the pid, so a recycled pid is not mistaken for the owner.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces; fields after its ")" are plain.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(labels: dict[str, str]) -> bool:
    try:
        pid = int(labels.get(f"{LABEL}.owner_pid", ""))
    except ValueError:
        return False
    return _start_time(pid) is not None and _start_time(pid) == labels.get(
        f"{LABEL}.owner_start"
    )


def _remove_sock_dir(path: str | None) -> None:
    # Labels are data from the daemon: only ever delete one of our own socket dirs.
    if path and os.path.isabs(path) and os.path.basename(path).startswith(_SOCK_PREFIX):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)  # see _lock_sock_dir
        shutil.rmtree(path, ignore_errors=True)


def reap_orphans(client: docker.DockerClient | None = None) -> int:
    """Remove kernel containers (and socket dirs) whose owning process on this host is gone.

    Returns how many containers were removed.
    """
    client = client or docker_client()
    removed = 0
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        labels = c.labels
        # The daemon may serve several hosts (or containers); their pids mean nothing here.
        if labels.get(f"{LABEL}.host") != socket.gethostname() or _owner_alive(labels):
            continue
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
            removed += 1
        _remove_sock_dir(labels.get(f"{LABEL}.sock_dir"))
    return removed


_reaped = False
_reap_lock = threading.Lock()
# Strong references: a kernel nobody closed (or kept) is still closed at exit.
_open_executors: set[DockerKernelExecutor] = set()


def _reap_once(client: docker.DockerClient) -> None:
    global _reaped
    with _reap_lock:
        if not _reaped:
            reap_orphans(client)
            atexit.register(_close_all)
            _reaped = True


def _close_all() -> None:
    """At interpreter exit: close every docker kernel that is still open."""
    for ex in list(_open_executors):
        with contextlib.suppress(Exception):
            ex.close()


class DockerKernelExecutor(KernelExecutor):
    """Run cells in an ipykernel inside a container of ``config.image``."""

    workdir = "/work"

    def __init__(self, config: ExecutorConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.container: Container | None = None
        self._client: docker.DockerClient | None = None
        self._sock_dir: str | None = None

    # -- KernelExecutor hooks ----------------------------------------------------------------
    def _launch(self) -> None:
        client = self._docker()
        self._sock_dir = owned_temp_dir(_SOCK_PREFIX)  # pid-named: see executors.tempdirs
        self._forks_dir = FORKS_DIR
        user = self._prepare_sock_dir()
        c = self.config
        mb = f"{c.memory_mb}m"
        _open_executors.add(self)
        self.container = client.containers.run(
            c.image,
            self.server_command("python3"),
            name=f"tirforge-kernel-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            detach=True,
            auto_remove=False,  # we remove it, after reading its logs if it failed to start
            init=True,  # docker-init as pid 1 (the fork server also reaps, as a subreaper)
            user=user,
            environment=_CONTAINER_ENV,
            working_dir=self.workdir,
            network_mode="none",
            read_only=True,
            tmpfs={
                self.workdir: f"size={c.max_file_mb}m,mode=1777,nosuid,nodev,noexec",
                "/tmp": "size=64m,mode=1777,nosuid,nodev,noexec",
                # One work dir per fork of the kernel (see KernelExecutor.fork).
                FORKS_DIR: f"size={c.max_file_mb}m,mode=1777,nosuid,nodev,noexec",
            },
            volumes={self._sock_dir: {"bind": self._sock_dir, "mode": "rw"}},
            mem_limit=mb,
            memswap_limit=mb,  # the same: no swap on top
            pids_limit=c.max_processes,
            nano_cpus=int(c.cpus * 1e9),
            ulimits=[
                Ulimit(name="cpu", soft=c.cpu_seconds, hard=c.cpu_seconds),
                Ulimit(name="fsize", soft=c.max_file_mb * 2**20, hard=c.max_file_mb * 2**20),
            ],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            # Bounded logs: a cell writing to fd 1 directly must not fill the host's disk.
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            labels={
                LABEL: "1",
                f"{LABEL}.owner_pid": str(os.getpid()),
                f"{LABEL}.owner_start": _start_time(os.getpid()) or "",
                f"{LABEL}.host": socket.gethostname(),
                f"{LABEL}.sock_dir": self._sock_dir,
            },
        )

    def _start_sandbox(self) -> None:
        try:
            super()._start_sandbox()
        except SandboxUnavailable:
            raise
        except (TimeoutError, RuntimeError) as e:
            if self.container is None:
                raise
            raise type(e)(f"{e}:\n{self._logs_tail()}") from None

    def _kill(self) -> None:
        if self.container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.container.remove(force=True)
            self.container = None
        _remove_sock_dir(self._sock_dir)
        self._sock_dir = None

    def _detach(self) -> None:
        super()._detach()
        self.container, self._client = None, None  # the remaining members close them
        self.workdir = DockerKernelExecutor.workdir

    def _scale_caps(self, kernels: int) -> None:
        if self.container is None:
            return
        # docker-py's update() has no pids limit: post the Engine API's update directly.
        api = self.container.client.api
        mem = self.config.memory_mb * kernels * 2**20
        data = {"Memory": mem, "MemorySwap": mem, "PidsLimit": self.config.max_processes * kernels}
        with contextlib.suppress(docker.errors.APIError, OSError):  # caps stay as they were
            res = api._post_json(api._url("/containers/{0}/update", self.container.id), data=data)
            api._raise_for_status(res)

    def _adopt_fork(self, child: KernelExecutor) -> None:
        assert isinstance(child, DockerKernelExecutor)
        _open_executors.add(child)

    def _sandbox_alive(self) -> bool:
        if self.container is None:
            return False
        try:
            self.container.reload()
        except docker.errors.NotFound:
            return False
        return self.container.status == "running"

    def _wipe_dirs(self) -> list[str]:
        return [self.workdir, "/tmp"]

    def _private_pids(self) -> bool:
        return True

    def _cleanup(self) -> None:
        _open_executors.discard(self)
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- helpers -----------------------------------------------------------------------------
    def _docker(self) -> docker.DockerClient:
        """The daemon client; on first use check the image and reap dead owners' kernels."""
        if self._client is None:
            client = docker_client()
            try:
                client.images.get(self.config.image)
            except docker.errors.ImageNotFound:
                client.close()
                raise SandboxUnavailable(
                    f"the sandbox image {self.config.image} does not exist: run "
                    "`tirforge sandbox build` (or .ci/docker-setup.sh)"
                ) from None
            _reap_once(client)
            self._client = client
        return self._client

    def _prepare_sock_dir(self) -> str:
        """Let the container user create sockets in the dir; return that user for Docker.

        As root we hand the dir to the sandbox uid (root still reaches its sockets). Otherwise
        the container runs as our own uid: sockets it creates must be ours to connect to.
        """
        assert self._sock_dir is not None
        if os.geteuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        os.chown(self._sock_dir, SANDBOX_UID, SANDBOX_UID)
        return f"{SANDBOX_UID}:{SANDBOX_UID}"

    def _unlock_sock_dir(self, conn_file: str) -> None:
        """Open the dir to the next kernel (bind sockets, read ``conn_file``): no cell runs
        until it is locked again."""
        assert self._sock_dir is not None
        os.chmod(conn_file, 0o600)  # holds the HMAC key
        if os.geteuid() == 0:  # the kernel's socket dir: the sandbox's, or a fork's below it
            for path in {self._sock_dir, os.path.dirname(conn_file), conn_file}:
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
        os.chmod(self._sock_dir, 0o700)

    def _lock_sock_dir(self) -> None:
        """Once the kernel is up it needs neither the key file nor the dir.

        The key file is already deleted; take the dir back, so a cell cannot fill the host's
        disk through this one host-backed mount. (A non-root host runs the kernel as itself,
        so there the chmod is only a speed bump.)
        """
        assert self._sock_dir is not None
        if os.geteuid() == 0:
            os.chown(self._sock_dir, 0, 0)
        os.chmod(self._sock_dir, 0o700 if os.geteuid() == 0 else 0o500)

    def _logs_tail(self) -> str:
        assert self.container is not None
        with contextlib.suppress(docker.errors.APIError):
            return self.container.logs(tail=30).decode(errors="replace")
        return "(no logs)"
