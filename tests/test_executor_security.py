"""Hostile cells against both sandboxed backends (local bubblewrap, Docker).

Each attack must be contained, the kernel (or its restarted successor) must still work, and the
host must be unaffected. Network probes only ever target this machine's loopback.
"""

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def usable(k) -> bool:
    return k.run("1 + 1").result == "2"


def host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def loopback_server():
    """A TCP server on the host's 127.0.0.1 that records whether anybody connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except TimeoutError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_no_network(make_kernel, loopback_server):
    port, hits = loopback_server
    # Sanity: the host can reach its own server, so a refusal inside means isolation.
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.monotonic() + 5
    while not hits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hits == [1]
    k = make_kernel()
    r = k.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert r.error_name in {"ConnectionRefusedError", "OSError", "TimeoutError"}, r.to_text()
    assert hits == [1]
    # Only a loopback interface exists: no route anywhere.
    assert k.run("[n for _, n in socket.if_nameindex()]").result == "['lo']"
    r = k.run("socket.getaddrinfo('tirforge-probe.invalid', 80)")
    assert r.error_name == "gaierror"
    assert usable(k)


def test_host_files_invisible(make_kernel, tmp_path):
    marker = tmp_path / "host-only.txt"
    marker.write_text("host secret")
    k = make_kernel()
    for path in (REPO / "pyproject.toml", marker, Path("/etc/shadow"), Path.home() / ".bashrc"):
        r = k.run(f"open({str(path)!r}).read()")
        assert r.error_name in {"FileNotFoundError", "PermissionError"}, (path, r.to_text())
    assert usable(k)


def test_parent_secrets_invisible(make_kernel, monkeypatch):
    monkeypatch.setenv("TIRFORGE_TEST_API_KEY", "sk-should-not-leak")
    k = make_kernel()
    r = k.run("import os; [v for v in os.environ.values() if 'should-not-leak' in v]")
    assert r.result == "[]"


def test_no_writes_outside_workdir(make_kernel, tmp_path):
    k = make_kernel()
    for path in ("/usr/evil.txt", "/etc/evil.txt", "/evil.txt", str(tmp_path / "evil.txt")):
        r = k.run(f"open({path!r}, 'w').write('x')")
        assert not r.ok, path
    assert not (tmp_path / "evil.txt").exists()
    assert k.run("open('ok.txt', 'w').write('fine')").result == "4"


def test_fork_bomb(make_kernel):
    k = make_kernel(max_processes=64)
    code = (
        "import os, time\n"
        "pids = []\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        pids.append(pid)\n"
        "except OSError as e:\n"
        "    print('blocked after', len(pids), type(e).__name__)\n"
        "for p in pids:\n"
        "    os.kill(p, 9)\n"
        "    os.waitpid(p, 0)\n"
    )
    r = k.run(code, timeout=60)
    assert "blocked after" in r.stdout, r.to_text()
    assert int(r.stdout.split()[2]) < 64
    assert usable(k)


def test_memory_bomb(make_kernel):
    k = make_kernel(memory_mb=1024)
    r = k.run("hog = []\nwhile True:\n    hog.append(bytearray(64 * 1024 * 1024))", timeout=60)
    # Local: RLIMIT_AS turns it into MemoryError. Docker: the cgroup OOM-kills the kernel.
    assert r.error_name == "MemoryError" or r.restarted, r.to_text()
    k.run("hog = None")
    assert usable(k)


def test_busy_loop(make_kernel):
    k = make_kernel()
    r = k.run("while True: pass", timeout=2)
    assert r.timed_out and usable(k)


def test_huge_output(make_kernel):
    k = make_kernel(max_output_chars=10_000)
    t0 = time.monotonic()
    r = k.run("chunk = 'x' * 1_000_000\nfor _ in range(100):\n    print(chunk)", timeout=60)
    assert len(r.stdout) < 10_100 and "[truncated" in r.stdout
    assert time.monotonic() - t0 < 90
    assert usable(k)


@pytest.mark.parametrize("crash", [
    "import os; os._exit(1)",
    "import ctypes; ctypes.string_at(0)",
])
def test_crashes(make_kernel, crash):
    k = make_kernel()
    r = k.run(crash)
    assert r.restarted and r.error_name == "KernelDied"
    assert usable(k)


def test_signal_ignoring_cell(make_kernel):
    k = make_kernel(interrupt_grace=1.0)
    r = k.run("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "time.sleep(60)", timeout=1.5)
    assert r.timed_out and r.restarted
    assert usable(k)


def test_background_process_dies_with_kernel(make_kernel):
    marker = f"tirforge-bg-{uuid.uuid4().hex}"
    k = make_kernel()
    r = k.run("import subprocess, sys\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', "
              f"'{marker}'], start_new_session=True)\np.pid")
    assert r.ok, r.to_text()
    time.sleep(0.5)
    assert host_processes_with(marker), "the background process never started"
    # A reset (pool return) kills what the cell left running ...
    k.reset()
    deadline = time.monotonic() + 10
    while host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host_processes_with(marker) == []
    # ... and so does closing the kernel.
    k.run(f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', "
          f"'{marker}-2'], start_new_session=True)")
    time.sleep(0.5)
    k.close()
    deadline = time.monotonic() + 10
    while host_processes_with(f"{marker}-2") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host_processes_with(f"{marker}-2") == []


def test_trajectories_are_isolated(make_kernel):
    a, b = make_kernel(), make_kernel()
    a.run("private = 'alpha'\nopen('a.txt', 'w').write('alpha')\nimport os\nwhere = os.getcwd()")
    assert b.run("private").error_name == "NameError"
    where = a.run("os.path.join(where, 'a.txt')").result.strip("'")
    r = b.run(f"open({where!r}).read()")
    # Docker kernels each have their own /work; local ones cannot see each other's dirs.
    assert r.result != "'alpha'"
    assert usable(a) and usable(b)
