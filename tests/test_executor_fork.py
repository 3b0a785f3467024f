"""``Executor.fork()``: a live kernel branched without re-running its cells, on both sandboxed
backends (bubblewrap and Docker), through the pool, and in step search."""

from __future__ import annotations

import time

import pytest

from tirforge.agent.backends.base import SamplingParams
from tirforge.agent.graph import AgentConfig
from tirforge.agent.search import StepSearchConfig, step_search
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.executors.result import ForkFailed

from .test_search import PROBLEM, REF, TURNS, Prefers
from .test_strategies import Scripted

pytestmark = pytest.mark.timeout(180)

# Cells of a history whose results a replay would not reproduce: unseeded randomness, a clock
# read, a file, an open sympy object (a solver's solution set and a matrix being edited).
HISTORY = [
    "import random, time, uuid, os\nimport numpy as np\nimport sympy as sp",
    "token = uuid.uuid4().hex\nstamp = time.time_ns()\nrng = np.random.default_rng()",
    "x = sp.Symbol('x')\nroots = sp.solve(x**3 - 6*x**2 + 11*x - 6, x)\n"
    "M = sp.Matrix([[1, 2], [3, 4]])",
    "with open('notes.txt', 'w') as f:\n    f.write(f'token={token}')\nlog = open('log.txt', 'a')",
]
STATE = "(token, stamp, sorted(roots), M.det(), open('notes.txt').read())"


def fill(k) -> str:
    for cell in HISTORY:
        r = k.run(cell)
        assert r.ok, r.to_text()
    return k.run(STATE).result


def test_a_fork_carries_the_state_without_rerunning(make_kernel):
    k = make_kernel()
    state = fill(k)
    f = k.fork()
    try:
        assert f.supports_fork and f is not k
        # Nothing was re-run: the execution count goes on from the parent's.
        count = "get_ipython().execution_count"
        assert f.run(count).result == k.run(count).result
        # Variables, a clock read, an open sympy object and a file written earlier: the same.
        assert f.run(STATE).result == state
        # A generator's state: the next draws agree (and differ from a fresh generator's).
        draws = "(random.random(), rng.integers(1 << 60))"
        assert f.run(draws).result == k.run(draws).result
        # The open file handle still writes (to the fork's own copy of the file).
        assert f.run("log.write('fork'); log.flush(); open('log.txt').read()").result == "'fork'"
        assert k.run("open('log.txt').read()").result == "''"
        # A fork of a fork carries the state too.
        g = f.fork()
        assert g.run(STATE).result == state
        g.close()
    finally:
        f.close()


def test_replay_would_not_reproduce_what_a_fork_keeps(make_kernel):
    k = make_kernel()
    state = fill(k)
    f = k.fork()
    fresh = make_kernel()
    try:
        assert f.run(STATE).result == state
        # Replaying the same cells recomputes them: another token, another clock read.
        assert fill(fresh) != state
    finally:
        f.close()


def test_parent_and_fork_are_independent(make_kernel):
    k = make_kernel()
    k.run("a = [1]\nopen('shared.txt', 'w').write('parent')")
    f = k.fork()
    try:
        f.run("a.append(2); b = 'fork only'\nopen('shared.txt', 'w').write('fork')\n"
              "import math; math.pi = 3")
        assert k.run("a, 'b' in dir(), open('shared.txt').read()").result == \
            "([1], False, 'parent')"
        assert k.run("import math; math.pi > 3").result == "True"
        k.run("a.append(3); c = 1\nopen('later.txt', 'w').write('x')")
        assert f.run("a, 'c' in dir(), open('shared.txt').read()").result == \
            "([1, 2], False, 'fork')"
        assert f.run("import os; os.path.exists('later.txt')").result == "False"
        # Each has its own work dir (the fork's is a copy); output goes to the one that ran.
        assert f.run("import os; os.getcwd()").result != k.run("os.getcwd()").result
        r = f.run("print('py'); os.system('echo from-a-subprocess')")
        assert "py" in r.stdout and "from-a-subprocess" in r.stdout
        assert "from-a-subprocess" not in k.run("print('parent')").stdout
    finally:
        f.close()
    assert k.run("a").result == "[1, 3]"  # closing the fork left the parent alone


def test_limits_and_reset_per_fork(make_kernel):
    k = make_kernel(memory_mb=1024)
    k.run("keep = 41")
    f = k.fork()
    try:
        # The cell timeout is the fork's own: it is interrupted, the parent never waited.
        r = f.run("while True: pass", timeout=1)
        assert r.timed_out and r.fault == "timeout" and not r.restarted
        assert f.run("keep + 1").result == "42"
        # Memory beyond the cap (local: the fork's address space; docker: the sandbox's cgroup,
        # which the fork shares) is the fork's fault, not the parent's.
        r = f.run("big = b'x' * (2600 * 2**20)")
        assert r.fault == "memory", r
        assert k.run("keep").result == "41"
        # A reset forgets the fork's state (it moves to a sandbox of its own); the parent keeps
        # its own.
        f.run("only_in_fork = 1")
        f.reset()
        assert f.run("only_in_fork").error_name == "NameError"
        assert f.run("import os; os.listdir('.')").result == "[]"
        assert k.run("keep").result == "41"
    finally:
        f.close()


def test_a_dead_parent_does_not_take_its_forks(make_kernel):
    k = make_kernel()
    k.run("v = 7")
    f = k.fork()
    try:
        done = f.run("v * 6")
        # The parent's kernel dies: it is restarted (into a sandbox of its own) ...
        r = k.run("import os; os._exit(1)")
        assert r.restarted and r.fault == "kernel_died"
        assert k.run("v").error_name == "NameError"
        # ... the fork's result is there and the fork goes on with its state.
        assert done.result == "42"
        assert f.run("v + 1").result == "8"
        # Closing the parent leaves the fork running too.
        k.close()
        assert f.run("v + 2").result == "9"
    finally:
        f.close()


def test_fork_of_a_dead_kernel_says_why(make_kernel, backend):
    k = make_kernel()
    pid = k.run("import os; os.getpid()").result
    f = k.fork()
    try:  # the fork shares the parent's PID namespace: it can end the parent's kernel
        f.run(f"import os, signal; os.kill({pid}, signal.SIGKILL)")
        deadline = time.monotonic() + 10
        while k.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ForkFailed) as e:
            k.fork()
        assert e.value.fault == "kernel_died"
    finally:
        f.close()
    # A kernel never started cannot be forked either.
    from tirforge.executors import make_executor

    with pytest.raises(ForkFailed) as e:
        make_executor(ExecutorConfig(backend=backend)).fork()
    assert e.value.fault == "start_failed"


def test_step_search_forks_on_auto(make_kernel):
    k = make_kernel()
    cfg = StepSearchConfig(beam_width=2, expansions_per_step=2,
                           agent=AgentConfig(max_turns=6, sampling=SamplingParams(temperature=0.7)))
    res = step_search(PROBLEM, Scripted(TURNS), k, Prefers("42"), cfg, reference=REF)
    assert res.kernel_state == "fork" and res.forks == 4 and res.replayed_cells == 0
    assert res.best.final_answer == "42" and res.best.steps[1].output.strip() == "x = 42"
    # Every fork was closed: the kernel is alone in its sandbox again.
    assert k._box is not None and k._box.members == {k}


def test_step_search_replays_where_the_executor_cannot_fork(make_kernel):
    k = make_kernel()

    class NoFork:  # an executor without fork support (supports_fork is absent)
        def __init__(self, inner):
            self.inner = inner

        def run(self, code, timeout=None):
            return self.inner.run(code, timeout)

        def reset(self):
            return self.inner.reset()

    cfg = StepSearchConfig(beam_width=2, expansions_per_step=2,
                           agent=AgentConfig(max_turns=6, sampling=SamplingParams(temperature=0.7)))
    res = step_search(PROBLEM, Scripted(TURNS), NoFork(k), Prefers("42"), cfg, reference=REF)
    assert res.kernel_state == "replay" and res.forks == 0 and res.replayed_cells > 0
    assert res.best.steps[1].output.strip() == "x = 42"
    with pytest.raises(ValueError, match="cannot fork"):
        step_search(PROBLEM, Scripted(TURNS), NoFork(k), Prefers("42"),
                    StepSearchConfig(kernel_state="fork"))


def test_the_pool_accounts_for_forks():
    with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap"), size=1, spare=0,
                    max_forks=2) as pool:
        k = pool.lease()
        k.run("n = 5")
        a, b = pool.fork(k), pool.fork(k)
        assert pool.forks == 2 and a.run("n").result == "5"
        with pytest.raises(TimeoutError):
            pool.fork(k, timeout=0.1)
        pool.release(a)  # closed, not reset for another trajectory
        assert pool.forks == 1
        c = pool.fork(k)
        assert c.run("n + 1").result == "6"
        # The parent comes back while its forks are out: it is reset into a sandbox of its own,
        # so the next trajectory never shares one with them.
        pool.release(k)
        k2 = pool.lease(timeout=60)
        assert k2.run("'n' in dir()").result == "False"
        assert k2._box is not None and k2._box.members == {k2}
        assert b.run("n").result == "5"
        for x in (b, c, k2):
            pool.release(x)
        assert pool.forks == 0


def test_async_executor_forks():
    import asyncio

    from tirforge.executors import AsyncExecutor, LocalKernelExecutor

    async def go() -> tuple[str | None, str | None]:
        a = AsyncExecutor(LocalKernelExecutor())
        await a.start()
        try:
            await a.run("z = 11")
            assert a.supports_fork
            f = await a.fork()
            try:
                await f.run("z = 0")
                return (await f.run("z + 1")).result, (await a.run("z + 1")).result
            finally:
                await f.close()
        finally:
            await a.close()

    assert asyncio.run(go()) == ("1", "12")


def test_step_search_falls_back_to_replay_when_forks_fail():
    from tirforge.executors import LocalKernelExecutor

    class Broken:  # says it can fork, then cannot (as a kernel that died would)
        supports_fork = True

        def __init__(self, inner):
            self.inner, self.tries = inner, 0

        def run(self, code, timeout=None):
            return self.inner.run(code, timeout)

        def reset(self):
            return self.inner.reset()

        def fork(self):
            self.tries += 1
            raise ForkFailed("no fork today", fault="kernel_died")

    cfg = StepSearchConfig(beam_width=2, expansions_per_step=2,
                           agent=AgentConfig(max_turns=6, sampling=SamplingParams(temperature=0.7)))
    with LocalKernelExecutor() as k:  # the fallback does not depend on the backend
        broken = Broken(k)
        res = step_search(PROBLEM, Scripted(TURNS), broken, Prefers("42"), cfg, reference=REF)
    assert broken.tries >= 1 and res.forks == 0 and res.replayed_cells > 0
    assert res.best.final_answer == "42" and res.best.steps[1].output.strip() == "x = 42"
