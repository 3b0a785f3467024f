"""The asyncio runner: many graph instances, micro-batched model calls, a real kernel pool."""

import time

import pytest

from tirforge.agent.backends.replay import ReplayBackend, ReplayExhausted
from tirforge.agent.graph import AgentConfig
from tirforge.agent.runner import RunnerConfig, run_many
from tirforge.executors import ExecutorConfig, KernelPool


@pytest.fixture(scope="module")
def pool():
    with KernelPool(ExecutorConfig(backend="local", timeout=10), size=4) as p:
        yield p


def script(i: int, sleep: float = 0.0) -> list[str]:
    code = f"```python\nimport time\ntime.sleep({sleep})\nv = {i} * {i}\nprint(v)\n```"
    return [code, f"So \\boxed{{{i * i}}}."]


def problems(n: int) -> list[dict]:
    return [{"problem": f"Problem {i:03d}: square {i}.", "answer": str(i * i), "id": f"t/{i}"}
            for i in range(n)]


def test_many_trajectories_batched(pool):
    probs = problems(12)
    backend = ReplayBackend({p["problem"]: script(i) for i, p in enumerate(probs)})
    seen = []
    trajs = run_many(probs, backend, pool, AgentConfig(), RunnerConfig(max_wait_ms=500),
                     progress=lambda done, total, t: seen.append((done, total)))
    assert [t.problem_id for t in trajs] == [p["id"] for p in probs]  # input order kept
    assert all(t.verdict == "correct" for t in trajs), [t.verdict for t in trajs]
    assert [t.steps[0].output.strip() for t in trajs] == [str(i * i) for i in range(12)]
    assert seen[-1] == (12, 12) and len(seen) == 12
    # 4 kernels: 4 trajectories at a time, whose model calls went out together.
    assert max(backend.batch_sizes) == 4
    assert sum(backend.batch_sizes) == 24


def test_kernels_run_while_others_wait(pool):
    probs = problems(4)
    backend = ReplayBackend({p["problem"]: script(i, sleep=0.6) for i, p in enumerate(probs)})
    t0 = time.perf_counter()
    trajs = run_many(probs, backend, pool)
    wall = time.perf_counter() - t0
    assert all(t.verdict == "correct" for t in trajs)
    assert wall < 4 * 0.6, f"cells did not overlap: {wall:.2f}s"


def test_tool_free_format_needs_no_pool():
    probs = problems(3)
    backend = ReplayBackend({p["problem"]: [f"\\boxed{{{i * i}}}"] for i, p in enumerate(probs)})
    trajs = run_many(probs, backend, None, AgentConfig(format="qwen-cot"))
    assert [t.verdict for t in trajs] == ["correct"] * 3
    assert all(t.format == "qwen-cot" for t in trajs)
    assert backend.batch_sizes == [3]
    with pytest.raises(ValueError, match="KernelPool"):
        run_many(probs, backend, None, AgentConfig(format="qwen-tir"))
    # A config error stops the run before any job, even when failures are collected per job.
    failed = []
    with pytest.raises(ValueError, match="no decomposition"):
        run_many(probs, backend, None, AgentConfig(format="qwen-cot", decompose=True),
                 on_result=lambda *a: failed.append(a))
    assert failed == []


def test_samples_get_their_own_seed():
    backend = ReplayBackend({"p": ["\\boxed{1}", "\\boxed{2}"]})
    cfg = AgentConfig(format="qwen-cot")
    cfg.sampling.seed = 7
    trajs = run_many(["p"], backend, None, cfg, RunnerConfig(samples=2))
    assert sorted(t.sampling["seed"] for t in trajs) == [7, 8]


def test_backend_errors_reach_the_caller(pool):
    backend = ReplayBackend({"p": ["```python\nprint(1)\n```"]})  # no second turn
    with pytest.raises(ReplayExhausted):
        run_many(["p"], backend, pool)


def test_formats_share_the_one_async_graph(pool):
    # dotamath decomposes first, qwen-tir does not: a routing decision of one compiled graph,
    # made from each run's context.
    probs = problems(2)
    plan = [" square it\n2. report it"]
    backend = ReplayBackend({p["problem"]: plan + script(i) for i, p in enumerate(probs)})
    trajs = run_many(probs, backend, pool, AgentConfig(format="dotamath"))
    assert [t.verdict for t in trajs] == ["correct"] * 2
    assert all(t.steps[0].text.endswith("2. report it") and t.steps[1].output for t in trajs)
    backend = ReplayBackend({p["problem"]: script(i) for i, p in enumerate(probs)})
    trajs = run_many(probs, backend, pool, AgentConfig(format="qwen-tir"))
    assert [t.verdict for t in trajs] == ["correct"] * 2 and len(trajs[0].steps) == 2


def test_one_bad_request_fails_only_its_own_trajectory():
    """A request the backend rejects (here: a problem with no script) shares a batch with three
    good ones; the batch is split until the bad one is alone, the others finish."""
    probs = problems(4)
    backend = ReplayBackend({p["problem"]: [f"\\boxed{{{i * i}}}"]
                             for i, p in enumerate(probs) if i != 2})
    results: dict[str, object] = {}
    run_many(probs, backend, None, AgentConfig(format="qwen-cot"), RunnerConfig(max_wait_ms=500),
             on_result=lambda p, k, r: results.__setitem__(p["id"], r))
    assert backend.batch_sizes[0] == 4  # they did go out together
    assert isinstance(results["t/2"], ReplayExhausted)
    assert [results[f"t/{i}"].verdict for i in (0, 1, 3)] == ["correct"] * 3


def test_a_batch_wide_error_is_not_retried_request_by_request():
    class Down(RuntimeError):
        batch_wide = True

    class DownBackend(ReplayBackend):
        def generate(self, requests, params):
            self.batch_sizes.append(len(requests))
            raise Down("server down")

    backend = DownBackend({})
    results: list[object] = []
    run_many(problems(4), backend, None, AgentConfig(format="qwen-cot"),
             RunnerConfig(max_wait_ms=500), on_result=lambda p, k, r: results.append(r))
    assert backend.batch_sizes == [4]
    assert len(results) == 4 and all(isinstance(r, Down) for r in results)
