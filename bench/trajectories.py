"""Store write throughput (trajectories/s) with and without fsync, and resume-scan speed.

    .venv/bin/python bench/trajectories.py [--n 2000] [--threads 4]

Records are realistic: 3 steps with code and output (~3 KB of JSON each). Grading throughput
and agreement are in bench/grading.py.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.store import Store, StoreConfig


def record(i: int) -> Trajectory:
    code = "from sympy import *\nx = symbols('x')\nprint(solve(x**2 - 5*x + 6, x))\n" * 3
    steps = [Step(text="Let me solve it.\n```python\n" + code + "```", code=code,
                  execution=ExecutionResult(stdout="[2, 3]\n"), output="[2, 3]")
             for _ in range(3)]
    steps.append(Step(text="So the answer is \\boxed{5}."))
    return Trajectory(problem="Sum of the roots of x^2-5x+6?" * 5, problem_id=f"bench/{i}",
                      sample=0, config_hash="bench", reference="5", steps=steps,
                      final_answer="5", verdict="correct")


def write(n: int, threads: int, fsync: bool) -> tuple[float, int]:
    recs = [record(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        store = Store(d, StoreConfig(fsync=fsync))
        per = n // threads
        t0 = time.perf_counter()
        ts = [threading.Thread(target=lambda k=k: [store.add(r) for r in
                                                    recs[k * per:(k + 1) * per]])
              for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        store.close()
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in store.shards())
        t1 = time.perf_counter()
        keys = Store(d).done_keys()
        scan = time.perf_counter() - t1
        assert len(keys) == per * threads
    return per * threads / dt, size // (per * threads), per * threads / scan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    for fsync in (True, False):
        rate, size, scan = write(args.n, args.threads, fsync)
        print(f"store write, fsync={'every record' if fsync else 'never':12} "
              f"{args.threads} threads: {rate:8.0f} traj/s  ({size} B/record); "
              f"resume scan {scan:8.0f} records/s")


if __name__ == "__main__":
    main()
