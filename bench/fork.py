"""Forking a live kernel vs restoring its state by replay, each baseline measured in the same run.

    .venv/bin/python bench/fork.py [--docker] [--quick]

1. ``Executor.fork()`` p50/p90 of a kernel that ran a 10-cell sympy history, vs replaying that
   history on a fresh kernel (a reset from the fork server, then the 10 cells: what step search
   did per candidate) and vs a cold start (a new sandbox and kernel, no history at all);
2. step search wall time with ``kernel_state="fork"`` vs ``"replay"`` on the same problems: a
   scripted model (no model time) whose turns are small sympy cells, B=2, M=2.

Backends: local (bubblewrap) always, docker with ``--docker``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from executors import CELLS, ms, pct  # noqa: E402  (bench/executors.py)
from tirforge.agent.backends.base import Completion, Request, SamplingParams  # noqa: E402
from tirforge.agent.graph import AgentConfig  # noqa: E402
from tirforge.agent.search import StepSearchConfig, step_search  # noqa: E402
from tirforge.agent.strategies import ExecutionScorer  # noqa: E402
from tirforge.executors import ExecutorConfig, make_executor  # noqa: E402

CONFIGS = {
    "local": ExecutorConfig(backend="local", sandbox="bwrap"),
    "docker": ExecutorConfig(backend="docker"),
}


def fork_latency(cfg: ExecutorConfig, n: int) -> tuple[list[float], list[float], list[float]]:
    """Seconds per fork, per reset + replay of CELLS, per cold start (n each)."""
    k = make_executor(cfg)
    k.start()
    for c in CELLS:
        assert k.run(c).ok
    forks = []
    for _ in range(n):
        t = time.perf_counter()
        f = k.fork()
        forks.append(time.perf_counter() - t)
        assert f.run("total").result == "32"  # the history's state, not re-run
        f.close()
    replays = []
    r = make_executor(cfg)
    r.start()
    for _ in range(n):
        t = time.perf_counter()
        r.reset()
        for c in CELLS:
            r.run(c)
        replays.append(time.perf_counter() - t)
    r.close()
    colds = []
    for _ in range(max(3, n // 4)):
        t = time.perf_counter()
        c = make_executor(cfg)
        c.start()
        colds.append(time.perf_counter() - t)
        c.close()
    k.close()
    return forks, replays, colds


# -- step search on a scripted model ---------------------------------------------------------
def _cell(code: str, note: str) -> str:
    return f"{note}\n```python\n{code}\n```"


def problem_turns(p: int) -> list[list[str]]:
    """Five code turns with two alternatives each (sympy work of a few ms to tens of ms), then
    two answers: a tree where replay re-runs O(depth) cells per candidate."""
    return [
        [_cell(f"x = sympy.Symbol('x'); e = (x + {p}) ** 6", "Set up."),
         _cell(f"x = sympy.Symbol('x'); e = (x - {p}) ** 6", "Set up the other way.")],
        [_cell("ex = sympy.expand(e)", "Expand."), _cell("ex = sympy.expand(e * 1)", "Expand it.")],
        [_cell("i = sympy.integrate(ex, x)", "Integrate."),
         _cell("i = sympy.integrate(ex, (x, 0, 1))", "Definite.")],
        [_cell("s = sympy.series(sympy.sin(x) * e, x, 0, 8)", "Series."),
         _cell("s = sympy.factor(ex)", "Factor.")],
        [_cell("v = sympy.Poly(ex, x).all_coeffs(); print(sum(v))", "Sum."),
         _cell("v = sympy.Poly(ex, x).all_coeffs(); print(v[-1])", "Constant.")],
        [f"So \\boxed{{{p ** 6}}}.", "So \\boxed{0}."],
    ]


class ScriptedModel:
    """Turn t of the prefix plays alternative (seed + i) % 2 for sample i (as the tests')."""

    name = "scripted"

    def __init__(self, turns: list[list[str]]):
        self.turns = turns

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        out = []
        for req in requests:
            t = sum(any(a in req.prefix for a in alts) for alts in self.turns)
            alts = self.turns[min(t, len(self.turns) - 1)]
            for i in range(params.n):
                text = alts[((params.seed or 0) + i) % len(alts)]
                out.append(Completion(text=text, finish_reason="stop", n_tokens=len(text.split())))
        return out


def search_walls(cfg: ExecutorConfig, problems: int) -> dict[str, list[float]]:
    """Per mode: seconds, forks made, cells replayed, over all problems. The modes alternate
    (which goes first too) problem by problem, so a change of machine load hits both alike."""
    kernels = {m: make_executor(cfg) for m in ("replay", "fork")}
    for k in kernels.values():
        k.start()
    out = {m: [0.0, 0, 0] for m in kernels}
    for p in range(1, problems + 1):
        for mode in (("replay", "fork") if p % 2 else ("fork", "replay")):
            sc = StepSearchConfig(beam_width=2, expansions_per_step=2, kernel_state=mode,  # type: ignore[arg-type]
                                  agent=AgentConfig(max_turns=8,
                                                    sampling=SamplingParams(temperature=0.7)))
            t = time.perf_counter()
            res = step_search(f"Problem {p}", ScriptedModel(problem_turns(p)), kernels[mode],
                              ExecutionScorer(), sc)
            out[mode][0] += time.perf_counter() - t
            assert res.kernel_state == mode and res.finished
            out[mode][1] += res.forks
            out[mode][2] += res.replayed_cells
    for k in kernels.values():
        k.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docker", action="store_true", help="also measure the docker backend")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 8 if args.quick else 20
    problems = 2 if args.quick else 4
    names = ["local", "docker"] if args.docker else ["local"]
    print("## 1. fork vs replaying a 10-cell sympy history vs cold start")
    for name in names:
        forks, replays, colds = fork_latency(CONFIGS[name], n)
        f50, r50, c50 = (statistics.median(x) for x in (forks, replays, colds))
        print(f"{name:6s} fork p50 {ms(f50)} p90 {ms(pct(forks, 0.9))} | reset + replay 10 cells "
              f"p50 {ms(r50)} p90 {ms(pct(replays, 0.9))} | cold start p50 {ms(c50)} "
              f"| fork {r50 / f50:.1f}x faster than replay, {c50 / f50:.1f}x than cold")
    print(f"## 2. step search wall time, {problems} problems, B=2 M=2, scripted sympy turns")
    for name in names:
        walls = search_walls(CONFIGS[name], problems)
        for mode, (wall, forks, replayed) in walls.items():
            print(f"{name:6s} {mode:6s} {wall:6.2f} s  forks {forks:3d}  "
                  f"cells replayed {replayed:3d}")
        print(f"{name:6s} fork {walls['replay'][0] / walls['fork'][0]:.2f}x faster than replay")


if __name__ == "__main__":
    main()
