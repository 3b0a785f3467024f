"""The local executor against a real ipykernel: outputs, errors, state, timeouts, death."""

import os
import sys
from pathlib import Path

import pytest

from tirforge.executors import ExecutionResult, LocalKernelExecutor
from tirforge.executors.result import strip_ansi, truncate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def k():
    with LocalKernelExecutor(timeout=10) as ex:
        yield ex


def test_stdout_and_result(k):
    r = k.run("print('hi')\n1 + 1")
    assert r.ok and r.stdout == "hi\n" and r.result == "2"
    assert r.to_text() == "hi\n2"
    assert k.run("1+1").result == "2"


def test_kernel_runs_this_interpreter(k):
    assert k.is_alive()
    assert k.run("import sys; sys.executable").result == repr(sys.executable)


def test_stderr(k):
    r = k.run("import sys; sys.stderr.write('warn\\n')")
    assert r.stderr == "warn\n" and r.ok
    assert "warn" in r.to_text()


def test_state_persists(k):
    k.run("counter = 41")
    r = k.run("counter += 1\ncounter")
    assert r.result == "42"


def test_error_has_clean_traceback(k):
    r = k.run("def f():\n    return undefined_thing\nf()")
    assert not r.ok
    assert r.error_name == "NameError" and "undefined_thing" in r.error_value
    assert "\x1b[" not in r.traceback
    text = r.to_text()
    assert "NameError: name 'undefined_thing' is not defined" in text
    assert "return undefined_thing" in text  # the failing line
    assert len(text.splitlines()) <= 5
    assert k.run("2 + 2").result == "4"  # an error leaves the kernel usable


def test_display_data(k):
    r = k.run("from IPython.display import display\ndisplay(123)")
    assert r.display_text == ["123"]


def test_timeout_interrupts_and_keeps_state(k):
    k.run("keep_me = 'still here'")
    r = k.run("while True:\n    pass", timeout=2)
    assert r.timed_out and not r.restarted and not r.ok
    assert r.error_name is None  # our own KeyboardInterrupt is not the cell's error
    assert "TimeoutError: cell exceeded 2s and was interrupted" in r.to_text()
    assert 2 <= r.duration_s < 10
    assert k.run("keep_me").result == "'still here'"


def test_uninterruptible_cell_restarts_kernel():
    with LocalKernelExecutor(timeout=1, interrupt_grace=1) as ex:
        ex.run("x = 1")
        # SIGINT is ignored, so only a restart gets the kernel back.
        r = ex.run(
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
        )
        assert r.timed_out and r.restarted
        assert "variables were lost" in r.to_text()
        assert ex.run("'x' in dir()").result == "False"
        assert ex.run("2 * 3").result == "6"


def test_kernel_death_is_reported_and_recovered():
    with LocalKernelExecutor(timeout=10) as ex:
        ex.run("y = 5")
        r = ex.run("import os; os._exit(1)")
        assert r.restarted and r.error_name == "KernelDied" and not r.ok
        assert "KernelDied" in r.to_text() and "variables were lost" in r.to_text()
        assert ex.is_alive()
        assert ex.run("1 + 2").result == "3"
        assert ex.run("'y' in dir()").result == "False"


def test_run_autostarts_and_close_is_idempotent():
    ex = LocalKernelExecutor()
    assert not ex.is_alive()
    assert ex.run("3 * 3").result == "9"
    ex.close()
    ex.close()
    assert not ex.is_alive()


def test_secrets_are_scrubbed_and_cwd_is_private(monkeypatch):
    monkeypatch.setenv("TIRFORGE_TEST_SECRET_TOKEN", "x")
    monkeypatch.setenv("TIRFORGE_TEST_PLAIN", "visible")
    ex = LocalKernelExecutor()
    with ex:
        r = ex.run(
            "import os; (os.environ.get('TIRFORGE_TEST_SECRET_TOKEN'), "
            "os.environ.get('TIRFORGE_TEST_PLAIN'), 'PATH' in os.environ, os.getcwd())"
        )
        secret, plain, has_path, cwd = eval(r.result)
        assert secret is None and plain == "visible" and has_path
        assert Path(cwd).resolve() == Path(ex.cwd).resolve() and cwd != os.getcwd()
        ex.run("open('scratch.txt', 'w').write('hi')")
        assert (Path(cwd) / "scratch.txt").exists()
    assert not Path(cwd).exists()


def test_given_cwd_is_kept(tmp_path):
    with LocalKernelExecutor(cwd=str(tmp_path)) as ex:
        assert Path(eval(ex.run("import os; os.getcwd()").result)) == tmp_path
    assert tmp_path.exists()


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
