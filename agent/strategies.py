"""Inference strategies: pick one answer out of N sampled trajectories.

``greedy`` takes the single (first) trajectory; ``majority`` the most common final answer
(grouped by mathematical equivalence); ``best-of-n`` the trajectory a scorer (an outcome reward
model) rates highest; ``weighted-majority`` sums scorer ratings per answer, as Qwen2.5-Math's
RM-weighted voting does. A scorer is anything with ``score(trajectories) -> list[float]``: the
trained RM (``tirforge.training.rm.RewardScorer``) or ``ExecutionScorer`` below, which needs no
model. ``step-search`` is not a choice among finished samples but a search while solving
(``tirforge.agent.search.step_search``): the scorer rates partial trajectories after every turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from tirforge.trajectories.metrics import group_answers
from tirforge.trajectories.schema import Trajectory

Strategy = Literal["greedy", "majority", "best-of-n", "weighted-majority"]
STRATEGIES: tuple[str, ...] = ("greedy", "majority", "best-of-n", "weighted-majority")
"""What ``choose`` accepts: ways to pick one of N finished trajectories."""
SOLVE_STRATEGIES: tuple[str, ...] = (*STRATEGIES, "step-search")
"""Everything ``tirforge solve --strategy`` accepts: ``choose``'s strategies and step search."""
SCORED_STRATEGIES: tuple[str, ...] = ("best-of-n", "weighted-majority", "step-search")
"""Strategies that need a scorer."""


class Scorer(Protocol):
    """Rates whole (or partial) trajectories: higher means more likely correct."""

    def score(self, trajectories: list[Trajectory]) -> list[float]: ...


class ExecutionScorer:
    """A model-free scorer: an answer, code that ran cleanly and few self-corrections score
    higher. A weak signal, but a real one for TIR (failed cells predict wrong answers)."""

    def score(self, trajectories: list[Trajectory]) -> list[float]:
        out = []
        for t in trajectories:
            runs = [s.execution for s in t.steps if s.execution is not None]
            ok = sum(r.ok for r in runs)
            s = (1.0 if t.final_answer else 0.0) + 0.5 * (ok / len(runs) if runs else 0.0)
            out.append(s - 0.1 * sum(1 for st in t.steps if st.feedback))
        return out


def choose(
    trajectories: Sequence[Trajectory], strategy: str = "greedy", scorer: Scorer | None = None
) -> Trajectory:
    """The trajectory whose answer ``strategy`` picks; ties go to the earliest sample."""
    if not trajectories:
        raise ValueError("no trajectories to choose from")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    trajs = list(trajectories)
    if strategy == "greedy" or len(trajs) == 1:
        return trajs[0]
    scores: list[float] | None = None
    if strategy in ("best-of-n", "weighted-majority"):
        if scorer is None:
            raise ValueError(f"strategy {strategy!r} needs a scorer (e.g. --rm PATH)")
        scores = scorer.score(trajs)
        for t, s in zip(trajs, scores, strict=True):
            t.score = s
    if strategy == "best-of-n":
        assert scores is not None
        return trajs[max(range(len(trajs)), key=lambda i: (scores[i], -i))]
    groups = group_answers([t.final_answer for t in trajs])
    weights = scores if scores is not None else [1.0] * len(trajs)
    totals: dict[int, float] = {}
    for g, w in zip(groups, weights, strict=True):
        if g >= 0:
            totals[g] = totals.get(g, 0.0) + w
    if not totals:  # nobody answered: fall back to the first sample
        return trajs[0]
    best = max(totals, key=lambda g: (totals[g], -g))
    return trajs[groups.index(best)]


def summarize_answers(trajectories: Sequence[Trajectory]) -> str:
    """One line of the answers and how often each came up, equivalent spellings grouped, most
    common first: ``"18 ×3, 20 ×1, (none) ×1"``."""
    groups = group_answers([t.final_answer for t in trajectories])
    counts: dict[int, int] = {}
    first: dict[int, str] = {}
    for t, g in zip(trajectories, groups, strict=True):
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, "(none)" if g < 0 else str(t.final_answer))
    order = sorted(counts, key=lambda g: (g < 0, -counts[g], g))
    return ", ".join(f"{first[g]} ×{counts[g]}" for g in order)
