"""What only the Docker backend does: container lockdown, HMAC, orphan reaping, the image.

These run against the real daemon and never skip: without Docker they fail and say how to get
it (.ci/docker-setup.sh). The behaviour and security suites run the docker kernel as well.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import docker.errors
import pytest
from jupyter_client import BlockingKernelClient
from typer.testing import CliRunner

from tirforge.apps.sandbox import sandbox_app
from tirforge.executors.docker import LABEL, DockerKernelExecutor, reap_orphans
from tirforge.executors.sandbox_image import (
    DEFAULT_IMAGE,
    DockerUnavailable,
    build_image,
    docker_client,
)

# Generous: the first test builds the image when it is missing (about two minutes offline).
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def client():
    try:
        c = docker_client()
    except DockerUnavailable as e:
        pytest.fail(f"{e}\nThe docker tests need a running daemon: run .ci/docker-setup.sh")
    # Builds the image when missing (a few minutes, offline); a no-op otherwise.
    build_image(log=lambda line: None)
    yield c
    c.close()


@pytest.fixture
def kernel(client):
    """Factory: a started docker kernel; all are closed after the test."""
    made = []

    def make(**overrides) -> DockerKernelExecutor:
        k = DockerKernelExecutor(timeout=10.0, **overrides)
        made.append(k)
        k.start()
        return k

    yield make
    for k in made:
        k.close()


def container_exists(client, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return False
    return True


def test_container_is_locked_down(kernel, client, monkeypatch):
    monkeypatch.setenv("TIRFORGE_TEST_TOKEN", "host-secret")
    k = kernel(memory_mb=512, max_processes=32, cpus=0.5, max_file_mb=16)
    attrs = client.containers.get(k.container.id).attrs
    host, cfg = attrs["HostConfig"], attrs["Config"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["PidsLimit"] == 32
    assert host["Memory"] == host["MemorySwap"] == 512 * 2**20
    assert host["NanoCpus"] == 500_000_000
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["Privileged"] is False
    # /forks: the work dirs of the kernel's forks (KernelExecutor.fork), sized like /work.
    assert set(host["Tmpfs"]) == {"/work", "/tmp", "/forks"}
    assert "size=16m" in host["Tmpfs"]["/work"] and "size=16m" in host["Tmpfs"]["/forks"]
    assert cfg["User"] == ("65534:65534" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}")
    # The only host path inside is the kernel's own socket dir.
    assert [m["Source"] for m in attrs["Mounts"]] == [k._sock_dir]
    assert not any("host-secret" in e for e in cfg["Env"])
    # And from the inside: nobody, no capabilities, no way to gain privileges.
    r = k.run("import os\nst = open('/proc/self/status').read()\n"
              "(os.getuid(), 'CapEff:\\t0000000000000000' in st, 'NoNewPrivs:\\t1' in st, "
              "os.getcwd())")
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    assert r.result == f"({uid}, True, True, '/work')", r.to_text()
    r = k.run("open('/work/big', 'wb').write(b'x' * 32 * 2**20)")  # over the 16 MB cap
    assert r.error_name == "OSError", r.to_text()
    assert "File too large" in r.error_value or "No space left" in r.error_value


def test_connection_is_signed_with_a_random_key(kernel):
    a, b = kernel(), kernel()
    key = a.kc.session.key
    assert a.kc.session.signature_scheme == "hmac-sha256" and len(key) == 64
    assert key != b.kc.session.key
    # The kernel signs with the same key, read from the connection file ...
    assert a.run("get_ipython().kernel.session.key").result == repr(key)
    # ... which is deleted once the sockets are bound: the key no longer sits on disk.
    assert sorted(os.listdir(a._sock_dir)) == ["k-1", "k-2", "k-3", "k-4", "k-5"]
    # A client holding the sockets but not the key is ignored by the kernel.
    forged = BlockingKernelClient()
    forged.load_connection_info({**a.kc.get_connection_info(), "key": secrets.token_hex(32)})
    forged.start_channels()
    try:
        forged.execute("open('/work/forged', 'w').write('x')")
        time.sleep(1.5)
    finally:
        forged.stop_channels()
    assert a.run("import os; os.path.exists('/work/forged')").result == "False"


def test_cells_cannot_write_to_the_socket_dir(kernel):
    k = kernel()
    # The one host-backed mount: after start-up it is closed to the kernel (no disk filling).
    r = k.run(f"open({os.path.join(k._sock_dir, 'fill')!r}, 'wb').write(b'x' * 1000)")
    assert r.error_name == "PermissionError", r.to_text()
    assert k.run("1 + 1").result == "2"


def test_close_leaves_no_container_and_no_socket_dir(kernel, client):
    k = kernel()
    cid, sock_dir = k.container.id, k._sock_dir
    assert container_exists(client, cid) and os.path.isdir(sock_dir)
    k.close()
    assert not container_exists(client, cid)
    assert not os.path.exists(sock_dir)
    k.close()  # twice is fine


def test_restart_after_the_kernel_exits(kernel, client):
    k = kernel()
    k.run("x = 1")
    old_id, old_sock = k.container.id, k._sock_dir
    # The kernel dies: the container's fork server forks a fresh one.
    r = k.run("import os; os._exit(1)")
    assert r.restarted and r.error_name == "KernelDied" and r.fault == "kernel_died"
    assert k.container.id == old_id
    assert k.run("'x' in dir(), int(np.int64(6) * 7)").result == "(False, 42)"
    # The cell kills the fork server itself: the whole container is replaced.
    k.run("x = 1")
    r = k.run("import os, signal; os.kill(os.getppid(), signal.SIGKILL); os._exit(1)")
    assert r.restarted and r.error_name == "KernelDied"
    assert k.container.id != old_id
    assert not container_exists(client, old_id) and not os.path.exists(old_sock)
    assert k.run("'x' in dir(), int(np.int64(6) * 7)").result == "(False, 42)"


def test_reaper_removes_containers_of_dead_owners(kernel, client):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now belongs to nobody (or, recycled, to a process of another age)
    sock_dir = tempfile.mkdtemp(prefix="tirforge-ipc-")
    orphan = client.containers.run(
        DEFAULT_IMAGE, ["sleep", "300"], detach=True, network_mode="none",
        labels={LABEL: "1", f"{LABEL}.owner_pid": str(dead.pid), f"{LABEL}.owner_start": "1",
                f"{LABEL}.host": socket.gethostname(), f"{LABEL}.sock_dir": sock_dir},
    )
    try:
        live = kernel()  # ours: the owner (this process) is alive, so it must survive
        assert reap_orphans(client) >= 1
        assert not container_exists(client, orphan.id)
        assert not os.path.exists(sock_dir)
        assert container_exists(client, live.container.id) and live.run("1 + 1").result == "2"
    finally:
        if container_exists(client, orphan.id):
            orphan.remove(force=True)


def run_owner(end: str) -> dict:
    """A separate Python that starts a docker kernel, then ends with ``end`` (no close())."""
    code = (
        "import json, os, signal\n"
        "from tirforge.executors.docker import DockerKernelExecutor\n"
        "k = DockerKernelExecutor(preload='')\n"
        "k.start()\n"
        "print(json.dumps({'id': k.container.id, 'sock': k._sock_dir}), flush=True)\n"
        f"{end}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout, f"the owner process failed to start a kernel:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[0])


def test_killed_owner_is_reaped(client):
    owner = run_owner("os.kill(os.getpid(), signal.SIGKILL)")  # no atexit, no close
    try:
        assert container_exists(client, owner["id"]), "the orphan should outlive its owner"
        assert reap_orphans(client) >= 1
        assert not container_exists(client, owner["id"]) and not os.path.exists(owner["sock"])
    finally:
        if container_exists(client, owner["id"]):
            client.containers.get(owner["id"]).remove(force=True)


def test_unclosed_kernel_is_removed_at_exit(client):
    owner = run_owner("raise SystemExit(0)")  # normal exit, close() never called
    assert not container_exists(client, owner["id"])
    assert not os.path.exists(owner["sock"])


def test_missing_image_says_how_to_build_it(client):
    k = DockerKernelExecutor(image="tirforge-sandbox:does-not-exist")
    with pytest.raises(RuntimeError, match="tirforge sandbox build"):
        k.start()
    r = k.run("1 + 1")  # run reports it, by kind, instead of raising
    assert r.fault == "sandbox_unavailable" and "tirforge sandbox build" in r.error_value


def test_unreachable_docker_says_so(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailable, match="start dockerd or use --executor local"):
        DockerKernelExecutor().start()
    assert DockerKernelExecutor().run("1").fault == "sandbox_unavailable"


def test_build_is_idempotent(client):
    first = build_image()
    lines = []
    t0 = time.monotonic()
    again = build_image(log=lines.append)
    assert again == first
    assert time.monotonic() - t0 < 5, "an existing image must not be rebuilt"
    assert any("already exists" in line for line in lines)


def test_cli_status_and_build(client):
    runner = CliRunner()
    r = runner.invoke(sandbox_app, ["status"])
    assert r.exit_code == 0, r.output
    assert "running" in r.output and DEFAULT_IMAGE in r.output
    r = runner.invoke(sandbox_app, ["build"])
    assert r.exit_code == 0 and "already exists" in r.output, r.output
    r = runner.invoke(sandbox_app, ["status", "--name", "tirforge-sandbox:does-not-exist"])
    assert r.exit_code == 1 and "missing" in r.output
