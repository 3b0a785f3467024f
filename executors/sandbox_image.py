"""Build the Docker image that the docker executor runs kernels in.

The image only needs ``python3`` with ipykernel, numpy, sympy and scipy; the executor supplies
every restriction at run time (no network, read-only root, nobody's uid, tmpfs ``/work``).
There are two ways to build it:

``dockerfile``
    ``executors/sandbox/Dockerfile``: ``python:3.11-slim`` plus pip packages. Needs a Docker
    registry (or the base image already pulled) and PyPI.

``debootstrap``
    Needs no registry, only a Debian mirror, and root: ``debootstrap --variant=minbase`` makes
    a bookworm root filesystem, ``apt-get`` installs the Debian packages of the maths stack
    into it, and ``docker import`` turns the directory into an image. Two hard dependencies
    are replaced by an empty stub package: scipy's on ``python3-pythran`` (a Python-to-C++
    compiler that drags in gcc, g++ and boost, ~600 MB) and ipykernel's on ``python3-debugpy``
    (which drags in gdb). Neither is imported by a kernel; ipykernel treats debugpy as
    optional. Docs, man pages and apt caches are dropped; the ``.pyc`` files are kept, since a
    read-only container could not write them and would recompile sympy on every start.

``auto`` (the default) returns at once when the image exists, else builds from the Dockerfile
when the daemon can reach a registry, else debootstraps. From the command line::

    tirforge sandbox build            # auto
    tirforge sandbox build --force --method debootstrap
    tirforge sandbox status
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import docker
import docker.errors
from docker.utils import parse_repository_tag

from tirforge.executors.result import SandboxUnavailable

DEFAULT_IMAGE = "tirforge-sandbox:latest"
#: Every image built here carries this label (``tirforge sandbox status`` shows it).
LABEL = "tirforge.sandbox"
DOCKERFILE_DIR = Path(__file__).resolve().parent / "sandbox"
DOCKERFILE_BASE = "python:3.11-slim"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3-ipykernel", "python3-numpy", "python3-sympy", "python3-scipy")
# Hard dependencies a kernel never uses, satisfied by an empty package (see the module doc).
STUBBED = ("python3-debugpy", "python3-pythran")
# Dropped from the root filesystem after installing (relative to it).
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "etc/resolv.conf",  # the host's, copied in so apt could resolve; Docker supplies its own
)
# Test suites inside the installed packages (sympy/**/tests alone is ~60 MB); nothing imports
# them at run time. (numpy.testing and sympy.testing are APIs and stay.)
TEST_DIRS_UNDER = "usr/lib/python3/dist-packages"
# What the import gives the image: the same environment the Dockerfile sets.
IMAGE_CHANGES = (
    f'LABEL {LABEL}="1"',
    "ENV HOME=/work",
    "ENV OPENBLAS_NUM_THREADS=1",
    "ENV OMP_NUM_THREADS=1",
    "ENV MKL_NUM_THREADS=1",
    "WORKDIR /work",
    "USER 65534:65534",
)

Method = Literal["auto", "dockerfile", "debootstrap"]
Log = Callable[[str], None]


class SandboxBuildError(RuntimeError):
    """The image could not be built; the message says why and what to do."""


class DockerUnavailable(SandboxUnavailable):
    """The Docker daemon does not answer."""


def docker_client(timeout: int = 60) -> docker.DockerClient:
    """A client of the local daemon, or a clear error when none answers."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as e:
        raise DockerUnavailable(
            f"Docker is not running ({e}): start dockerd or use --executor local"
        ) from e
    return client


def image_exists(name: str = DEFAULT_IMAGE, client: docker.DockerClient | None = None) -> bool:
    """Whether the daemon has an image called ``name``."""
    client = client or docker_client()
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def registry_reachable(client: docker.DockerClient, image: str = DOCKERFILE_BASE) -> bool:
    """Whether the daemon could pull ``image`` (already local, or its registry answers)."""
    if image_exists(image, client):
        return True
    try:
        # The daemon asks the registry for the manifest: honours its mirrors and proxies,
        # and fails within milliseconds when DNS does not resolve.
        client.images.get_registry_data(image)
    except docker.errors.APIError:
        return False
    return True


def build_image(
    name: str = DEFAULT_IMAGE,
    method: Method = "auto",
    log: Log = print,
    *,
    force: bool = False,
) -> str:
    """Build the sandbox image ``name`` and return its id.

    ``auto`` is idempotent: an existing image is returned at once unless ``force``. An explicit
    ``method`` always builds. Progress lines go to ``log``.
    """
    if method not in ("auto", "dockerfile", "debootstrap"):
        raise ValueError(f"method must be auto, dockerfile or debootstrap, not {method!r}")
    client = docker_client(timeout=600)
    try:
        if method == "auto" and image_exists(name, client) and not force:
            log(f"image {name} already exists (use --force to rebuild)")
            return client.images.get(name).id
        return _build(client, name, method, log)
    finally:
        client.close()


def _build(client: docker.DockerClient, name: str, method: Method, log: Log) -> str:
    old_id = client.images.get(name).id if image_exists(name, client) else None
    t0 = time.monotonic()
    if method == "auto" and not registry_reachable(client):
        log(f"no registry answers for {DOCKERFILE_BASE}: building offline with debootstrap")
        method = "debootstrap"
    if method in ("auto", "dockerfile"):
        try:
            _build_dockerfile(client, name, log)
        except SandboxBuildError as e:
            if method == "dockerfile":
                raise
            log(f"{e}\nfalling back to debootstrap")  # e.g. the registry answers, PyPI not
            method = "debootstrap"
        else:
            method = "dockerfile"
    if method == "debootstrap":
        _build_debootstrap(client, name, log)
    image = client.images.get(name)
    if old_id is not None and old_id != image.id:
        # The replaced image is now untagged; drop it unless a container still uses it.
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(old_id)
    log(
        f"built {name} ({image.short_id}) with {method} in {time.monotonic() - t0:.0f}s, "
        f"{image.attrs['Size'] / 1e6:.0f} MB"
    )
    return image.id


# -- from the Dockerfile ---------------------------------------------------------------------
def _build_dockerfile(client: docker.DockerClient, name: str, log: Log) -> None:
    # The low-level API streams the build log; images.build() only returns it at the end.
    stream = client.api.build(path=str(DOCKERFILE_DIR), tag=name, rm=True, decode=True)
    for chunk in stream:
        if "error" in chunk:
            raise SandboxBuildError(f"docker build failed: {chunk['error'].strip()}")
        for line in str(chunk.get("stream") or chunk.get("status") or "").splitlines():
            if line.strip():
                log(line.rstrip())


# -- offline, from a debootstrapped Debian ---------------------------------------------------
def _build_debootstrap(client: docker.DockerClient, name: str, log: Log) -> None:
    if os.geteuid() != 0:
        raise SandboxBuildError(
            "building the sandbox image with debootstrap needs root (it chroots and creates "
            "device files): run `sudo .venv/bin/tirforge sandbox build`, or build with "
            "--method dockerfile where a Docker registry is reachable"
        )
    for tool in ("debootstrap", "unshare", "tar"):
        if shutil.which(tool) is None:
            raise SandboxBuildError(f"`{tool}` is not installed: apt-get install -y {tool}")
    # /var/tmp is disk-backed where /tmp may be a small tmpfs; the tree is ~400 MB.
    work = Path(tempfile.mkdtemp(prefix="tirforge-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        log(f"debootstrap {SUITE} into {rootfs}")
        _stream(["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR], log)
        _write_stub_package(rootfs)
        log(f"installing {' '.join(PACKAGES)}")
        _stream(_in_chroot(rootfs, _INSTALL_SCRIPT.format(packages=" ".join(PACKAGES))), log)
        _trim(rootfs)
        (rootfs / "work").mkdir(mode=0o1777, exist_ok=True)
        (rootfs / "work").chmod(0o1777)
        log(f"importing {rootfs} as {name}")
        _import_rootfs(client, rootfs, name)
    finally:
        _unmount_under(work)  # raises rather than let rmtree loose on a mounted host dir
        shutil.rmtree(work, ignore_errors=True)


_STUB_CONTROL = """\
Package: tirforge-sandbox-stubs
Version: 1.0
Architecture: all
Maintainer: tirforge <tirforge@localhost>
Provides: {provides}
Description: empty stand-ins for tools a sandboxed kernel never runs
"""

_INSTALL_SCRIPT = """\
export DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mirror=$(awk '/^deb /{{print $2; exit}}' /etc/apt/sources.list)
echo "deb $mirror-security bookworm-security main" >> /etc/apt/sources.list
dpkg-deb --build /tmp/stubs /tmp/stubs.deb
dpkg -i /tmp/stubs.deb
rm -rf /tmp/stubs /tmp/stubs.deb
# No pty in the chroot: tell dpkg not to look for one.
apt="apt-get -y -o Dpkg::Use-Pty=0"
$apt update
$apt upgrade
$apt install --no-install-recommends {packages}
$apt clean
python3 -c 'import ipykernel, numpy, scipy, sympy; print("python imports ok")'
"""


def _trim(rootfs: Path) -> None:
    """Empty the TRIM dirs and delete the packages' test suites."""
    for rel in TRIM:
        path = rootfs / rel
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                _remove(child)
        elif path.exists() or path.is_symlink():
            path.unlink()
    # Collected first: deleting while rglob walks would pull the tree from under it.
    for tests in sorted((rootfs / TEST_DIRS_UNDER).rglob("tests")):
        if tests.is_dir() and not tests.is_symlink():  # False once a parent is gone
            shutil.rmtree(tests)


def _unmount_under(path: Path) -> None:
    """Unmount whatever an interrupted debootstrap left mounted in ``path`` (/proc, /sys, and
    in some containers bind mounts of the host's /dev), so deleting the tree cannot reach
    through a mount into the host. Repeats: unmounting one may uncover another below it."""
    prefix = f"{path}/"
    for _ in range(10):
        with open("/proc/self/mounts") as f:
            points = [p for p in (line.split()[1] for line in f) if p.startswith(prefix)]
        if not points:
            return
        for point in sorted(points, reverse=True):  # children before their parents
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    raise SandboxBuildError(f"could not unmount everything under {path}; remove it by hand")


def _write_stub_package(rootfs: Path) -> None:
    control = rootfs / "tmp/stubs/DEBIAN/control"
    control.parent.mkdir(parents=True)
    control.write_text(_STUB_CONTROL.format(provides=", ".join(STUBBED)))


def _in_chroot(rootfs: Path, script: str) -> list[str]:
    # A private mount namespace: the /proc mounted inside vanishes with the process, so a
    # failed build leaves no mount behind on the host.
    return ["unshare", "--mount", "--fork", "chroot", str(rootfs), "/bin/sh", "-ec", script]


def _stream(cmd: list[str], log: Log) -> None:
    """Run ``cmd``, passing each output line to ``log``; raise with the tail on failure."""
    tail: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                log(line)
                tail = [*tail[-19:], line]
    if proc.returncode != 0:
        raise SandboxBuildError(
            f"{cmd[0]} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail)
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _import_rootfs(client: docker.DockerClient, rootfs: Path, name: str) -> None:
    """``tar -C rootfs -c . | docker import``, streamed: the tree never sits in memory."""
    cmd = ["tar", "--numeric-owner", "-C", str(rootfs)]
    cmd += ["--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        assert tar.stdout is not None and tar.stderr is not None

        def chunks() -> Iterator[bytes]:
            while chunk := tar.stdout.read(1 << 20):
                yield chunk

        repo, tag = parse_repository_tag(name)
        with contextlib.closing(tar.stdout):
            # A generator body goes out with chunked transfer encoding.
            client.api.import_image_from_data(
                chunks(), repository=repo, tag=tag or "latest", changes=list(IMAGE_CHANGES)
            )
        err = tar.stderr.read().decode(errors="replace")
    if tar.returncode != 0:
        raise SandboxBuildError(f"tar of {rootfs} failed: {err.strip()}")
