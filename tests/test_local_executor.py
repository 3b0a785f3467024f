"""Local-backend specifics: interpreter, lifecycle, environment, work dir, sandbox selection.

The behaviour and security suites (test_executor_*.py) run against the bubblewrap sandbox;
the module fixture here runs unsandboxed, so that mode is exercised too.
"""

import os
import sys
from pathlib import Path

import pytest

from tirforge.executors import ExecutionResult, LocalKernelExecutor
from tirforge.executors.local import bwrap_available
from tirforge.executors.result import strip_ansi, truncate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def k():
    with LocalKernelExecutor(sandbox="none", timeout=10) as ex:
        yield ex


def test_unsandboxed_basics(k):
    r = k.run("print('hi')\n1 + 1")
    assert r.ok and r.stdout == "hi\n" and r.result == "2"
    assert r.to_text() == "hi\n2"
    r = k.run("while True: pass", timeout=1)
    assert r.timed_out and k.run("2 + 2").result == "4"


def test_unsandboxed_fork_has_a_host_work_dir_of_its_own(k):
    k.run("import os\nopen('f.txt', 'w').write('parent')\nv = 3")
    f = k.fork()
    try:
        cwd = f.run("os.getcwd()").result.strip("'")
        assert cwd != k.cwd and Path(cwd, "f.txt").read_text() == "parent"  # a host dir
        f.run("open('f.txt', 'w').write('fork')")
        assert Path(k.cwd, "f.txt").read_text() == "parent" and f.run("v").result == "3"
    finally:
        f.close()
    assert not Path(cwd).exists()  # the fork's dir went with it


def test_kernel_runs_this_interpreter(k):
    assert k.is_alive()
    assert k.run("import sys; sys.executable").result == repr(sys.executable)


def test_run_autostarts_and_close_is_idempotent():
    ex = LocalKernelExecutor()
    assert not ex.is_alive()
    assert ex.run("3 * 3").result == "9"
    ex.close()
    ex.close()
    assert not ex.is_alive()


@pytest.mark.parametrize("sandbox", ["none", "bwrap"])
def test_host_env_is_not_passed_and_cwd_is_private(monkeypatch, sandbox):
    monkeypatch.setenv("TIRFORGE_TEST_SECRET_TOKEN", "x")
    monkeypatch.setenv("TIRFORGE_TEST_PLAIN", "not on the allowlist either")
    ex = LocalKernelExecutor(sandbox=sandbox)
    with ex:
        r = ex.run(
            "import os; (os.environ.get('TIRFORGE_TEST_SECRET_TOKEN'), "
            "os.environ.get('TIRFORGE_TEST_PLAIN'), 'PATH' in os.environ, os.getcwd())"
        )
        secret, plain, has_path, cwd = eval(r.result)
        assert secret is None and plain is None and has_path
        assert Path(cwd).resolve() == Path(ex.cwd).resolve() and cwd != os.getcwd()
        assert ex.run("open('scratch.txt', 'w').write('hi')").ok
        # Unsandboxed the work dir is the host dir; in bwrap a sized tmpfs over it.
        assert (Path(cwd) / "scratch.txt").exists() == (sandbox == "none")
    assert not Path(cwd).exists()


def test_given_cwd_is_kept(tmp_path):
    with LocalKernelExecutor(cwd=str(tmp_path)) as ex:
        assert Path(eval(ex.run("import os; os.getcwd()").result)) == tmp_path
    assert tmp_path.exists()


def test_bwrap_is_used_by_default_and_missing_bwrap_fails_closed(monkeypatch):
    assert bwrap_available(), "bubblewrap must be installed (apt-get install bubblewrap)"
    assert LocalKernelExecutor().sandbox == "bwrap"
    monkeypatch.setenv("PATH", "/nonexistent")
    for mode in ("auto", "bwrap"):  # never silently unsandboxed
        with pytest.raises(RuntimeError, match="apt-get install bubblewrap") as e:
            LocalKernelExecutor(sandbox=mode)
        assert "--executor docker" in str(e.value) and "--sandbox none" in str(e.value)
    assert LocalKernelExecutor(sandbox="none").sandbox == "none"  # only when asked by name


def test_truncation_marker():
    s = "a" * 5000 + "END"
    t = truncate(s, 200)
    assert len(t) <= 200 and "[truncated" in t and t.startswith("a") and t.endswith("END")
    r = ExecutionResult(stdout="x" * 10_000)
    text = r.to_text(max_chars=500)
    assert len(text) <= 500 and "\n...[truncated " in text and " chars]...\n" in text
    assert truncate("short", 200) == "short"


def test_strip_ansi():
    assert strip_ansi("\x1b[0;31mNameError\x1b[0m: boom") == "NameError: boom"


def test_kernel_outlives_the_thread_that_started_it():
    # bwrap --die-with-parent follows the forking *thread*; a pool starts kernels in worker
    # threads that end, and the kernel must not die with them.
    import threading
    import time

    ex = LocalKernelExecutor(sandbox="bwrap")
    try:
        t = threading.Thread(target=ex.start)
        t.start()
        t.join()
        time.sleep(0.5)
        assert ex.is_alive()
        r = ex.run("1 + 1")
        assert r.result == "2" and not r.restarted
    finally:
        ex.close()


def test_private_tmp_does_not_hide_a_venv_under_tmp(tmp_path):
    # CI may clone into /tmp: the venv bound read-only below /tmp must sit on top of the
    # sandbox's private /tmp, not under it.
    ex = LocalKernelExecutor(sandbox="bwrap")
    ex.workdir, ex._sock_dir = str(tmp_path / "w"), str(tmp_path / "s")
    args = ex._bwrap_prefix()
    tmpfs = args.index("/tmp", args.index("--tmpfs"))
    binds = [i for i, a in enumerate(args) if a in ("--ro-bind", "--bind")]
    assert binds and all(i > tmpfs for i in binds)


def test_limits_are_per_kernel_cgroups_removed_at_close():
    ex = LocalKernelExecutor(sandbox="bwrap", memory_mb=700)
    ex.start()
    cg = ex._cgroup
    assert cg is not None or os.geteuid() != 0  # as root the whole tree is capped
    dirs, sock = (list(cg.dirs.values()) if cg else []), ex._sock_dir
    if cg is not None and "memory" in cg.dirs:
        limit = next(f for f in ("memory.max", "memory.limit_in_bytes")
                     if os.path.exists(os.path.join(cg.dirs["memory"], f)))
        assert int(Path(cg.dirs["memory"], limit).read_text()) == 700 * 2**20
    assert ex.run("1").ok
    ex.close()
    assert not any(os.path.exists(d) for d in dirs) and not os.path.exists(sock)
