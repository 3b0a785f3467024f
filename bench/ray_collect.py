"""Collection throughput on Ray: 2 actors vs 1 actor vs the plain one-process `collect`.

    .venv/bin/python bench/ray_collect.py [--n 12] [--samples 2] [--kernels 2] [--model]

Every mode collects the same N problems x K samples into a fresh store, with real sandboxed
kernels (bwrap) and the same total number of kernels (``--kernels``: the plain run's pool, the
one actor's pool, split in halves over two actors). Backend: the replay script below (the
kernels do the work) or, with ``--model``, the default model SmolLM2-135M on the CPU (each actor
loads its own copy). Ray runs as a local one-node instance started here with ``--cpus``.
Trajectories/min count the collection only; start-up (Ray, actors, models, kernels) is
reported apart. Ratios are against the plain run of the same invocation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tirforge.agent.backends.base import SamplingParams  # noqa: E402
from tirforge.agent.graph import AgentConfig  # noqa: E402
from tirforge.agent.pipelines.collect import make_run_backend, run_collect  # noqa: E402
from tirforge.agent.pipelines.distributed import BackendSpec, RayCollector, RayConfig  # noqa: E402
from tirforge.executors import ExecutorConfig, KernelPool  # noqa: E402
from tirforge.trajectories.datasets import FieldMap, load_dataset, load_file  # noqa: E402
from tirforge.trajectories.store import Store  # noqa: E402

# Two cells of CPU work (~0.15 s each on an idle core: a brute-force count and sympy), then
# the answer: the kernels, not the replay, are the cost, as with a fast model server.
TURNS = [
    "Let me count.\n```python\nprint(sum(i * i % 7 for i in range(10**6)))\n```",
    "And check with sympy.\n```python\nx = sympy.Symbol('x')\n"
    "print(sympy.factorint(2**64 + 1), sympy.solve(x**3 - 6*x**2 + 11*x - 6, x))\n```",
    "So the answer is \\boxed{6}.",
]
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_gsm8k.jsonl"


def problems(n: int) -> list:
    try:
        return load_dataset("gsm8k", limit=n)
    except FileNotFoundError:  # no shared data: the 6 fixture problems, repeated under new ids
        base = load_file(FIXTURE, FieldMap("question", "answer", "gsm8k"), name="tiny")
        out = []
        for i in range(n):
            p = base[i % len(base)]
            out.append(replace(p, id=f"tiny/{i}"))
        return out


def plain(probs, args, spec: BackendSpec, agent: AgentConfig) -> tuple[float, float]:
    t0 = time.perf_counter()
    backend = (spec.build(args.kernels) if spec.replay_turns is not None
               else make_run_backend(spec.model, max_batch=args.kernels))
    with tempfile.TemporaryDirectory() as d, Store(d) as store, KernelPool(
            ExecutorConfig(sandbox="bwrap", pool_size=args.kernels)) as pool:
        startup = time.perf_counter() - t0
        rep = run_collect(probs, samples=args.samples, store=store, cfg_hash="b", backend=backend,
                          pool=pool, agent_cfg=agent, concurrency=args.kernels)
        assert rep.new == len(probs) * args.samples and rep.failed == 0, rep.errors
        return startup, rep.seconds


def on_ray(probs, args, spec: BackendSpec, agent: AgentConfig, actors: int
           ) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    cfg = RayConfig(actors=actors, concurrency=max(1, args.kernels // actors),
                    env={"HF_HUB_OFFLINE": "1"})
    with tempfile.TemporaryDirectory() as d, Store(d) as store, RayCollector(
            spec, ExecutorConfig(sandbox="bwrap"), cfg) as rc:
        startup = time.perf_counter() - t0
        rep = rc.collect(probs, samples=args.samples, store=store, cfg_hash="b", agent_cfg=agent)
        assert rep.new == len(probs) * args.samples and rep.failed == 0, rep.errors
        per = ", ".join(f"{w.name} {w.trajectories} traj {w.per_minute:.0f}/min"
                        for w in rep.workers)
        return startup, rep.seconds, per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="problems")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--kernels", type=int, default=2, help="kernels in all, every mode")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--model", action="store_true", help="the default model, not the replay")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    import ray

    probs = problems(args.n)
    spec = BackendSpec(model="smollm2") if args.model else BackendSpec(replay_turns=TURNS)
    agent = AgentConfig(max_turns=3, sampling=SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=0.7))
    n = len(probs) * args.samples
    what = "smollm2 (CPU)" if args.model else "replay"
    print(f"{n} trajectories ({len(probs)} x {args.samples}), backend {what}, "
          f"{args.kernels} kernels in all, {os.cpu_count()} cores")
    results = {"plain collect": (*plain(probs, args, spec, agent), "")}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             object_store_memory=300 * 2**20, log_to_driver=False)
    try:
        for actors in (1, 2):
            results[f"--ray, {actors} actor(s)"] = on_ray(probs, args, spec, agent, actors)
    finally:
        ray.shutdown()
    base = n / results["plain collect"][1]
    print("| mode | start-up s | collect s | traj/min | vs plain | per actor |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (startup, secs, per) in results.items():
        rate = n / secs
        print(f"| {name} | {startup:.1f} | {secs:.1f} | {60 * rate:.1f} | {rate / base:.2f}x "
              f"| {per} |")


if __name__ == "__main__":
    main()
