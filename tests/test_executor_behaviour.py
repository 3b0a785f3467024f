"""What every executor backend must do, run against real kernels (local bwrap and Docker)."""

import asyncio

import pytest

from tirforge.executors import AsyncExecutor, ExecutionResult
from tirforge.executors.kernel import _Capped

pytestmark = pytest.mark.timeout(180)


def test_outputs_state_errors(make_kernel):
    k = make_kernel()
    r = k.run("print('hi')\nimport sys; sys.stderr.write('warn\\n')\n1 + 1")
    assert (r.stdout, r.stderr, r.result, r.ok) == ("hi\n", "warn\n", "2", True)
    k.run("counter = 41")
    assert k.run("counter += 1\ncounter").result == "42"
    r = k.run("def f():\n    return undefined_thing\nf()")
    assert not r.ok and r.error_name == "NameError" and "undefined_thing" in r.error_value
    assert "\x1b[" not in r.traceback
    assert "NameError" in r.to_text() and "undefined_thing" in r.to_text()


def test_preloaded_imports(make_kernel):
    k = make_kernel()
    r = k.run("(int(np.arange(3).sum()), sympy.Rational(1, 3) + sp.Rational(1, 6), Fraction(1, 2),"
              " math.gcd(12, 18))")
    assert r.result == "(3, 1/2, Fraction(1, 2), 6)"


def test_display_and_png(make_kernel):
    k = make_kernel()
    png = "89504e470d0a1a0a"  # PNG magic
    r = k.run("from IPython.display import display, Image\n"
              f"display(Image(data=bytes.fromhex('{png}') + b'rest', format='png'))\n"
              "display(123)")
    assert r.images and r.images[0].startswith(bytes.fromhex(png))
    assert "123" in r.display_text
    # Bytes survive the JSON round trip of a trajectory file.
    again = ExecutionResult.model_validate_json(r.model_dump_json())
    assert again.images == r.images


def test_timeout_interrupts_and_keeps_state(make_kernel):
    k = make_kernel()
    k.run("keep_me = 'still here'")
    r = k.run("while True:\n    pass", timeout=1.5)
    assert r.timed_out and not r.restarted and not r.ok
    assert "TimeoutError" in r.to_text() and r.duration_s < 10
    assert k.run("keep_me").result == "'still here'"


def test_interrupt_from_another_thread(make_kernel):
    import threading

    k = make_kernel()
    k.run("keep_me = 1")
    threading.Timer(1.0, k.interrupt).start()
    r = k.run("import time\ntime.sleep(30)", timeout=20)
    assert r.error_name == "KeyboardInterrupt" and not r.timed_out and not r.restarted
    assert r.duration_s < 10
    assert k.run("keep_me").result == "1"


def test_death_is_reported_and_recovered(make_kernel):
    k = make_kernel()
    k.run("x = 1")
    r = k.run("import os; os._exit(1)")
    assert r.restarted and r.error_name == "KernelDied"
    assert "variables were lost" in r.to_text()
    assert k.run("'x' in dir()").result == "False"
    assert k.run("int(np.int64(2) * 3)").result == "6"  # preload ran again after the restart


def test_reset_clears_namespace_and_workdir(make_kernel):
    k = make_kernel()
    k.run("secret = 1\nopen('leftover.txt', 'w').write('x')\nimport os\nos.mkdir('d')")
    assert k.reset() is False  # fast path, no restart
    r = k.run("import os; ('secret' in dir(), sorted(os.listdir('.')))")
    assert r.result == "(False, [])"
    assert k.run("sp.Integer(2)**10").result == "1024"


def test_reset_restarts_a_dead_kernel(make_kernel):
    k = make_kernel()
    k._kill()
    assert not k.is_alive()
    assert k.reset() is True
    assert k.run("1 + 1").result == "2"


def test_output_is_capped(make_kernel):
    k = make_kernel(max_output_chars=1000)
    r = k.run("for i in range(2000):\n    print('line', i)")
    assert len(r.stdout) < 1100 and "[truncated" in r.stdout
    assert r.stdout.startswith("line 0\n") and r.stdout.rstrip().endswith("line 1999")


def test_async_executor(make_kernel):
    k = make_kernel()

    async def main():
        a = AsyncExecutor(k)
        await a.run("y = 5")
        results = await asyncio.gather(*(a.run(f"y + {i}") for i in range(5)))
        return [r.result for r in results]

    assert asyncio.run(main()) == ["5", "6", "7", "8", "9"]


def test_async_executor_in_its_own_threads(make_kernel):
    # The coroutine graph runs cells this way: a pool as wide as the kernels in use.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    k = make_kernel()
    seen: list[str] = []
    real_run = k.run

    def run(code, timeout=None):
        seen.append(threading.current_thread().name)
        return real_run(code, timeout)

    k.run = run
    with ThreadPoolExecutor(2, thread_name_prefix="cell") as threads:

        async def main():
            a = AsyncExecutor(k, threads)
            await a.run("z = []")
            # Serialised on one kernel: every append sees the ones before it.
            await asyncio.gather(*(a.run(f"z.append(len(z) == {i})") for i in range(4)))
            return (await a.run("print(all(z), len(z))")).stdout.strip()

        assert asyncio.run(main()) == "True 4"
    assert seen and all(name.startswith("cell") for name in seen)


def test_capped_stream_keeps_head_and_tail():
    c = _Capped(10)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        c.add(ch)
    assert c.value() == "abcde\n...[truncated 16 chars]...\nvwxyz"
