"""Agent benchmarks: framework overhead per turn, and batched vs one-at-a-time throughput.

    .venv/bin/python bench/agent.py                 # both parts, prints a markdown table
    .venv/bin/python bench/agent.py --part overhead

Overhead: the replay backend (no model) and a trivial cell, so everything that is not model or
kernel time is framework (LangGraph, prompt format, runner, batcher). Measured with an in-process
null kernel from 1 to 256 concurrent trajectories, and with real sandboxed kernels.

Throughput: the default model (SmolLM2-135M) on CPU, the same problems solved by ``solve`` one at
a time and by ``run_many`` with batched model calls.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tirforge.agent.backends.base import Completion, Request, SamplingParams  # noqa: E402
from tirforge.agent.graph import AgentConfig, solve  # noqa: E402
from tirforge.agent.runner import RunnerConfig, run_many  # noqa: E402
from tirforge.executors import ExecutorConfig, KernelPool  # noqa: E402
from tirforge.executors.result import ExecutionResult  # noqa: E402

CELL = "```python\nprint(1 + 1)\n```"
TURNS = 4  # per trajectory: 3 code turns and an answer


class ScriptBackend:
    """Replay without bookkeeping: code until the prefix holds 3 outputs, then the answer."""

    name = "script"

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        return [
            Completion(CELL if r.prefix.count("```output") < TURNS - 1 else "\\boxed{2}", "stop", 4)
            for r in requests
        ]


class NullKernel:
    """A kernel that answers at once: isolates the framework's own cost."""

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        return ExecutionResult(stdout="2\n")

    # KernelPool interface
    def start(self) -> None: ...
    def reset(self) -> bool: return False
    def restart(self) -> None: ...
    def is_alive(self) -> bool: return True
    def close(self) -> None: ...


def overhead(rows: list[str]) -> None:
    cfg = AgentConfig(max_turns=TURNS + 1)
    # Sync `solve`, one trajectory at a time, null kernel.
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        traj = solve("p", ScriptBackend(), NullKernel(), cfg, reference="2")
    assert traj.verdict == "correct"
    per_turn = (time.perf_counter() - t0) / (n * TURNS)
    rows.append(f"| `solve`, null kernel | 1 | {per_turn * 1e3:.2f} ms | - |")
    print(rows[-1], flush=True)
    # The asyncio runner, null kernels, 1 .. 256 at once.
    for width in (1, 4, 16, 64, 256):
        with KernelPool(size=width, factory=lambda _: NullKernel()) as pool:
            probs = ["p"] * max(width, 32)
            t0 = time.perf_counter()
            trajs = run_many(probs, ScriptBackend(), pool, cfg,
                             RunnerConfig(max_concurrency=width, max_batch=256))
            wall = time.perf_counter() - t0
        assert all(t.final_answer == "2" for t in trajs)
        per_turn = wall / (len(probs) * TURNS)
        rows.append(f"| `run_many`, null kernel | {width} | {per_turn * 1e3:.3f} ms | - |")
        print(rows[-1], flush=True)
    # Real sandboxed kernels, trivial cell: what share of the wall time is framework?
    for width in (1, 4):
        # Twice as many kernels as trajectories in flight, so that a kernel's reset between
        # trajectories (in the background) is not counted as per-turn overhead.
        with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap"), size=2 * width) as pool:
            probs = ["p"] * 8 * width
            t0 = time.perf_counter()
            trajs = run_many(probs, ScriptBackend(), pool, cfg,
                             RunnerConfig(max_concurrency=width))
            wall = time.perf_counter() - t0
        kernel = sum(t.timings["execute_s"] for t in trajs) / width  # kernels run in parallel
        share = max(0.0, wall - kernel) / wall
        per_turn = max(0.0, wall - kernel) / (len(probs) * TURNS / width)
        rows.append(f"| `run_many`, bwrap kernel, `print(1 + 1)` | {width} | "
                    f"{per_turn * 1e3:.2f} ms | {share:.1%} |")
        print(rows[-1], flush=True)


PROBLEMS = [
    ("What is 17 * 23 + 5?", "396"),
    ("What is the sum of the squares of the first 20 positive integers?", "2870"),
    ("How many primes are there below 100?", "25"),
    ("What is 2 to the power 20?", "1048576"),
    ("What is the least common multiple of 12 and 18?", "36"),
    ("What is 1001 divided by 7?", "143"),
    ("What is the remainder when 2024 is divided by 9?", "8"),
    ("What is 15 factorial divided by 13 factorial?", "210"),
]


def throughput(rows: list[str], n: int, max_new_tokens: int) -> None:
    from tirforge.agent.backends.hf import TransformersBackend
    from tirforge.agent.models import resolve_model

    backend = TransformersBackend(resolve_model("smollm2"))
    cfg = AgentConfig(max_turns=3, sampling=SamplingParams(max_new_tokens=max_new_tokens))
    probs = [{"problem": p, "answer": a} for p, a in PROBLEMS[:n]]
    with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap"), size=n) as pool:
        t0 = time.perf_counter()
        for p in probs:
            with pool.kernel() as k:
                solve(p["problem"], backend, k, cfg, reference=p["answer"])
        seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_many(probs, backend, pool, cfg, RunnerConfig(max_batch=n))
        bat = time.perf_counter() - t0
    rows.append(f"| one at a time (`solve`) | {n} | {seq:.0f} s | {60 * n / seq:.1f} |")
    rows.append(f"| batched (`run_many`) | {n} | {bat:.0f} s | {60 * n / bat:.1f} |")
    print("\n".join(rows[-2:]))
    print(f"batched / one-at-a-time throughput ratio: {seq / bat:.2f}x", flush=True)
    rows.append(f"\nBatched / one-at-a-time throughput: **{seq / bat:.2f}x**.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["overhead", "throughput", "all"], default="all")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    out = []
    if args.part in ("overhead", "all"):
        rows = ["| setup | concurrent | framework time per turn | share of wall time |",
                "|---|---|---|---|"]
        overhead(rows)
        out += ["Framework overhead per turn (replay backend, no model):", "", *rows, ""]
    if args.part in ("throughput", "all"):
        rows = ["| runner | problems | wall | trajectories / minute |", "|---|---|---|---|"]
        throughput(rows, args.problems, args.max_new_tokens)
        out += ["End-to-end with SmolLM2-135M on CPU (qwen-tir, 3 turns, "
                f"{args.max_new_tokens} tokens per turn):", "", *rows, ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
