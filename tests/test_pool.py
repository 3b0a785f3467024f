"""KernelPool: warm leases, reset on return, bounds, dead kernels, asyncio, clean shutdown."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tirforge.executors import ExecutorConfig, KernelPool

from .conftest import BACKENDS

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def pool(backend):
    with KernelPool(ExecutorConfig(**BACKENDS[backend]), size=2) as p:
        yield p


def wait_idle(pool, n=None, timeout=20):
    n = pool.capacity if n is None else n
    deadline = time.monotonic() + timeout
    while pool.idle < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.idle == n


def test_lease_reset_on_return(pool):
    assert pool.idle == pool.capacity == 4  # size 2 + two spares
    with pool.kernel() as k:
        k.run("leak = 'from trajectory 1'")
    wait_idle(pool)
    seen = []
    for _ in range(2):  # whichever kernel we get, it was reset
        k = pool.lease()
        seen.append(k.run("'leak' in dir()").result)
    assert seen == ["False", "False"]


def test_lease_without_timeout_waits_for_a_return(pool):
    import threading

    a, b = pool.lease(), pool.lease()  # all leased
    threading.Timer(0.3, pool.release, (a,)).start()
    t0 = time.monotonic()
    c = pool.lease()  # no timeout: blocks until the return, never raises
    assert time.monotonic() - t0 >= 0.25
    pool.release(c)
    pool.release(b)


def test_spare_covers_the_reset(pool):
    # Return and lease at once, as a collection worker does: a ready spare, no reset wait.
    wait_idle(pool)
    waits = []
    for _ in range(3):
        k = pool.lease()
        pool.release(k)
        t0 = time.monotonic()
        k = pool.lease()
        waits.append(time.monotonic() - t0)
        pool.release(k)
        wait_idle(pool)
    assert sorted(waits)[1] < 0.05, waits


def test_bounded(pool):
    a, b = pool.lease(), pool.lease()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="pool size 2"):
        pool.lease(timeout=0.3)
    assert time.monotonic() - t0 < 2
    pool.release(a)
    c = pool.lease(timeout=20)  # a is resetting: the spare (or a) comes back
    pool.release(c)
    pool.release(b)


def test_dead_kernel_is_replaced(pool):
    k = pool.lease()
    k._kill()  # dies while leased
    pool.release(k)
    wait_idle(pool)
    for _ in range(2):
        assert pool.lease().run("1 + 1").result == "2"


def test_asyncio_leases(pool):
    async def trajectory(i):
        async with pool.akernel(timeout=60) as k:
            await asyncio.to_thread(k.run, f"v = {i}")
            r = await asyncio.to_thread(k.run, "v * 10")
            return r.result

    async def main():
        return await asyncio.gather(*(trajectory(i) for i in range(6)))

    assert asyncio.run(main()) == [str(i * 10) for i in range(6)]


def test_close_stops_every_kernel(backend):
    p = KernelPool(ExecutorConfig(**BACKENDS[backend]), size=2).start()
    leased = p.lease()
    p.close()
    assert not leased.is_alive()
    p.close()  # twice is fine


def test_sigterm_shuts_kernels_down(tmp_path):
    script = tmp_path / "host.py"
    script.write_text(
        "import os, time\n"
        "from tirforge.executors import KernelPool, ExecutorConfig\n"
        "pool = KernelPool(ExecutorConfig(sandbox='bwrap'), size=2).start()\n"
        "pool.install_signal_handlers()\n"
        "k = pool.lease()\n"
        "print(k.run('import os; os.getppid()').result, flush=True)\n"
        "print([kk.proc.pid for kk in pool._all], flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    pids = eval(proc.stdout.readline())
    assert all(Path(f"/proc/{p}").exists() for p in pids)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
