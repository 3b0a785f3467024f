"""Executor figures, each with a baseline measured in the same run.

    .venv/bin/python bench/executors.py [--docker] [--quick]

1. trivial-cell round trip p50/p99 (local bwrap, local unsandboxed, docker) vs a plain
   jupyter_client BlockingKernelClient on a KernelManager kernel;
2. warm lease from the pool p50 vs cold start;
3. a 10-turn trajectory (one small sympy cell per turn) on the stateful kernel vs the replay
   style of earlier TIR evaluators (each turn re-runs every earlier cell in a fresh process);
4. throughput of trivial cells with 1, 4 and 16 concurrent kernels;
5. returning a kernel: the old in-kernel reset (namespace clear, kill the kernel's own
   descendants -- leaks daemons, threads' state, builtins, modules; kept here as the baseline)
   vs the fork server's fresh kernel: reset p50, pool resets/s, and the lease p50 at a
   collection's steady state (workers that hold a kernel ``HOLD_S``, return it, lease again).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from jupyter_client import KernelManager

from tirforge.executors import ExecutorConfig, KernelPool, make_executor

CELLS = [
    "x = sympy.Symbol('x')",
    "expr = (x + 1) ** 5",
    "expanded = sympy.expand(expr)",
    "coeffs = sympy.Poly(expanded, x).all_coeffs()",
    "total = sum(coeffs)",
    "roots = sympy.solve(x**2 - 5*x + 6, x)",
    "s = sympy.summation(sympy.Symbol('k')**2, (sympy.Symbol('k'), 1, 20))",
    "f = sympy.factorint(360)",
    "d = sympy.diff(sympy.sin(x) * x**2, x)",
    "print(total, roots, s, f, d)",
]


# The pre-fork-server pool reset, run in the kernel (the "before" of section 5).
LEGACY_RESET = """
import os as _o, shutil as _s, signal as _g
def _descendants(pid):
    found = []
    for tid in _o.listdir(f"/proc/{pid}/task"):
        try:
            kids = open(f"/proc/{pid}/task/{tid}/children").read().split()
        except OSError:
            kids = []
        for kid in map(int, kids):
            found += [kid, *_descendants(kid)]
    return found
for _pid in _descendants(_o.getpid()):
    try:
        _o.kill(_pid, _g.SIGKILL)
    except OSError:
        pass
_o.chdir(WORKDIR)
for _n in _o.listdir("."):
    if _o.path.isdir(_n) and not _o.path.islink(_n):
        _s.rmtree(_n, ignore_errors=True)
    else:
        _o.remove(_n)
def _wipe():
    import gc
    ip = get_ipython()
    ip.history_manager.reset(False)
    ip.user_ns["_oh"].clear()
    ip.displayhook._ = ip.displayhook.__ = ip.displayhook.___ = ""
    ip.last_execution_result = None
    ns = ip.user_global_ns
    for k in [k for k in ns if k not in ("__builtin__", "__builtins__", "__name__")]:
        del ns[k]
    ip.user_ns_hidden.clear()
    ip.init_user_ns()
    gc.collect(1)
_wipe()
"""


def legacy(cfg: ExecutorConfig):
    """An executor whose reset is the old in-kernel one (cell + preload, no new process)."""
    k = make_executor(cfg)

    def reset() -> bool:
        r = k._run(LEGACY_RESET.replace("WORKDIR", repr(k.workdir)), 5.0, may_restart=False)
        assert r.ok, r.to_text()
        k._preload()
        return False

    k.reset = reset
    return k


def reset_p50(k, n: int) -> float:
    out = []
    for _ in range(n):
        k.run("x = 1")
        t0 = time.perf_counter()
        k.reset()
        out.append(time.perf_counter() - t0)
    return pct(out, .5)


def pool_resets_per_s(pool: KernelPool, seconds: float) -> float:
    """Kernels returned and re-leased per second, one trivial cell per lease."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        k = pool.lease(timeout=60)
        k.run("1")
        pool.release(k)
        n += 1
    return n / (time.perf_counter() - t0)


def steady_leases(pool: KernelPool, workers: int, seconds: float, hold: float) -> list[float]:
    """Each worker: lease (timed), two trivial cells, hold ``hold`` s (generation), return."""
    waits: list[float] = []

    def work() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            k = pool.lease(timeout=60)
            waits.append(time.perf_counter() - t0)
            k.run("1")
            k.run("2")
            time.sleep(hold)
            pool.release(k)

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda _: work(), range(workers)))
    return waits


# Seconds a worker holds a kernel per trajectory: model generation dominates a trajectory
# (seconds per turn on CPU), so 1 s is on the short side of a collection's steady state.
HOLD_S = 1.0


def section_reset(configs: dict[str, ExecutorConfig], quick: bool) -> None:
    print("\n## 5. returning a kernel: old in-kernel reset (before) vs fork server (after)")
    n, secs, workers = (10, 3.0, 4) if quick else (40, 8.0, 4)
    for name, cfg in configs.items():
        row = {}
        for mode in ("before", "after"):
            k = legacy(cfg) if mode == "before" else make_executor(cfg)
            with k:
                row[f"{mode} reset p50"] = reset_p50(k, n)
            factory = legacy if mode == "before" else make_executor
            spare = 0 if mode == "before" else None  # the old pool had no spares
            with KernelPool(cfg, size=workers, spare=spare, factory=factory) as pool:
                row[f"{mode} resets/s"] = pool_resets_per_s(pool, secs)
                while pool.idle < pool.capacity:
                    time.sleep(0.01)
                waits = steady_leases(pool, workers, secs, hold=HOLD_S)
            row[f"{mode} lease p50"] = statistics.median(waits)
            row[f"{mode} lease p99"] = pct(waits, .99)
        print(f"{name:20s} reset p50 {ms(row['before reset p50'])} -> {ms(row['after reset p50'])}"
              f"  pool resets/s {row['before resets/s']:6.1f} -> {row['after resets/s']:6.1f}"
              f"  steady lease p50 {ms(row['before lease p50'])} -> {ms(row['after lease p50'])}"
              f" (p99 {ms(row['before lease p99'])} -> {ms(row['after lease p99'])})")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(x: float) -> str:
    return f"{x * 1e3:7.2f} ms"


def round_trips(k, n: int) -> list[float]:
    k.run("1")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        k.run("1+1")
        out.append(time.perf_counter() - t0)
    return out


def plain_client_round_trips(n: int) -> list[float]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            kc.execute_interactive("1+1", output_hook=lambda m: None, timeout=10)
            out.append(time.perf_counter() - t0)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def replay_style(cells: list[str]) -> float:
    """Qwen2.5-Math's evaluator style: turn i runs cells[:i+1] in a fresh process."""
    t0 = time.perf_counter()
    for i in range(len(cells)):
        program = "import sympy\n" + "\n".join(cells[: i + 1])
        subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    return time.perf_counter() - t0


def stateful(k, cells: list[str]) -> float:
    t0 = time.perf_counter()
    for c in cells:
        r = k.run(c)
        assert r.ok, r.to_text()
    return time.perf_counter() - t0


def throughput(cfg: ExecutorConfig, n_kernels: int, cells_each: int) -> float:
    with ThreadPoolExecutor(n_kernels) as ex:
        kernels = list(ex.map(lambda _: make_executor(cfg), range(n_kernels)))
        list(ex.map(lambda k: k.start(), kernels))
        t0 = time.perf_counter()
        list(ex.map(lambda k: [k.run("1+1") for _ in range(cells_each)], kernels))
        dt = time.perf_counter() - t0
        list(ex.map(lambda k: k.close(), kernels))
    return n_kernels * cells_each / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docker", action="store_true", help="also measure the docker backend")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-reset", action="store_true", help="only section 5")
    args = ap.parse_args()
    n = 50 if args.quick else 300
    configs = {
        "local (bwrap)": ExecutorConfig(sandbox="bwrap"),
        "local (no sandbox)": ExecutorConfig(sandbox="none"),
    }
    if args.docker:
        configs["docker"] = ExecutorConfig(backend="docker")

    if args.only_reset:
        del configs["local (no sandbox)"]
        section_reset(configs, args.quick)
        return
    print("## 1. trivial cell round trip")
    base = plain_client_round_trips(n)
    print(f"{'plain BlockingKernelClient':28s} p50 {ms(pct(base, .5))}  p99 {ms(pct(base, .99))}")
    cold: dict[str, float] = {}
    for name, cfg in configs.items():
        k = make_executor(cfg)
        t0 = time.perf_counter()
        k.start()
        cold[name] = time.perf_counter() - t0
        rt = round_trips(k, n)
        ratio = pct(base, .5) / pct(rt, .5)
        print(f"{name:28s} p50 {ms(pct(rt, .5))}  p99 {ms(pct(rt, .99))}  "
              f"({ratio:.2f}x the plain client's speed)")
        k.close()

    print("\n## 2. warm lease vs cold start")
    for name, cfg in configs.items():
        with KernelPool(cfg, size=2) as pool:
            leases = []
            for _ in range(50 if args.quick else 200):
                t0 = time.perf_counter()
                k = pool.lease(timeout=60)
                leases.append(time.perf_counter() - t0)
                pool.release(k)
                while pool.idle < 2:
                    time.sleep(0.001)
        p50 = pct(leases, .5)
        print(f"{name:28s} warm lease p50 {ms(p50)}  cold start {cold[name]:.2f} s  "
              f"({cold[name] / p50:,.0f}x faster)")

    print("\n## 3. 10-turn sympy trajectory: stateful kernel vs replay style")
    t_replay = replay_style(CELLS)
    print(f"{'replay (fresh process/turn)':28s} {t_replay:.2f} s")
    for name, cfg in configs.items():
        with make_executor(cfg) as k:
            t = stateful(k, CELLS)
        print(f"{name:28s} {t:.3f} s  ({t_replay / t:.0f}x faster)")

    print("\n## 4. throughput of trivial cells, concurrent kernels (threads, one kernel each)")
    cells_each = 20 if args.quick else 100
    for name, cfg in configs.items():
        one = None
        for n_k in (1, 4, 16):
            tp = throughput(cfg, n_k, cells_each)
            one = one or tp
            print(f"{name:28s} {n_k:2d} kernels: {tp:7.0f} cells/s  ({tp / one:.2f}x of 1)")
    section_reset({k: v for k, v in configs.items() if "no sandbox" not in k}, args.quick)


if __name__ == "__main__":
    main()
