"""Sample-selection metrics of the Qwen2.5-Math evaluation protocol: pass@k, maj@k, RM@k.

Each function takes one problem's samples in sampling order (the first k are "the first k
samples") and returns a 0/1 outcome (pass@k: a probability); a benchmark's figure is the mean
over problems, times 100. ``score_table`` does that for a whole set.

Answers are grouped by mathematical equivalence, not string equality: ``1/2``, ``0.5`` and
``\\frac{1}{2}`` are one vote. Grouping compares each answer with one representative per group,
after a cheap normalised-string match, so a problem with n samples costs at most n·groups calls
of the grader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb

from tirforge.trajectories.grading import answers_equal, normalize

Equal = Callable[[str, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    ``n`` samples, ``c`` of them correct; the chance that k samples drawn without replacement
    contain at least one correct one.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def group_answers(answers: Sequence[str | None], equal: Equal = answers_equal) -> list[int]:
    """Group id of each answer (first-seen order); None (no answer) gets -1 and never votes."""
    reps: list[str] = []  # one representative answer per group
    keys: dict[str, int] = {}  # normalised string -> group, the fast path
    ids = []
    for a in answers:
        if a is None or not a.strip():
            ids.append(-1)
            continue
        key = normalize(a)
        gid = keys.get(key)
        if gid is None:
            gid = next((g for g, rep in enumerate(reps) if equal(a, rep)), None)
            if gid is None:
                gid = len(reps)
                reps.append(a)
            keys[key] = gid
        ids.append(gid)
    return ids


def _vote(groups: Sequence[int], weights: Sequence[float]) -> int | None:
    """The group with the largest total weight; ties go to the group seen first."""
    totals: dict[int, float] = {}
    for g, w in zip(groups, weights, strict=True):
        if g >= 0:
            totals[g] = totals.get(g, 0.0) + w
    if not totals:
        return None
    return max(totals, key=lambda g: (totals[g], -g))


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    *,
    equal: Equal = answers_equal,
    groups: Sequence[int] | None = None,
) -> float:
    """1.0 if the most common answer among the first k samples is correct, else 0.0."""
    groups = list(groups if groups is not None else group_answers(answers, equal))[:k]
    winner = _vote(groups, [1.0] * len(groups))
    return _outcome_of_group(winner, groups, correct)


def weighted_maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    scores: Sequence[float],
    k: int,
    *,
    equal: Equal = answers_equal,
    groups: Sequence[int] | None = None,
) -> float:
    """Majority vote where each sample votes with its reward-model score."""
    groups = list(groups if groups is not None else group_answers(answers, equal))[:k]
    winner = _vote(groups, list(scores[:k]))
    return _outcome_of_group(winner, groups, correct)


def rm_at_k(correct: Sequence[bool], scores: Sequence[float], k: int) -> float:
    """Outcome of the sample with the highest RM score among the first k (first wins ties)."""
    if k < 1 or k > len(correct):
        raise ValueError(f"need 1 <= k <= {len(correct)}, got {k}")
    best = max(range(k), key=lambda i: (scores[i], -i))
    return float(bool(correct[best]))


def _outcome_of_group(winner: int | None, groups: Sequence[int], correct: Sequence[bool]) -> float:
    if winner is None:
        return 0.0
    # Every member of a group holds the same answer; the first member's verdict stands for it.
    return float(bool(correct[groups.index(winner)]))


@dataclass
class ProblemSamples:
    """One problem's samples, in sampling order."""

    answers: list[str | None]
    """Extracted final answer of each sample (None: the sample gave none)."""
    correct: list[bool]
    """Verdict of each sample against the reference."""
    scores: list[float] | None = None
    """Reward-model score of each sample, if an RM scored them."""


def score_table(
    problems: Sequence[ProblemSamples], k: int, *, equal: Equal = answers_equal
) -> dict[str, float]:
    """A benchmark's row: mean accuracy over all samples, greedy-like first sample (``acc@1``),
    ``pass@k``, ``maj@k`` and, when scores are present, ``rm@1``, ``rm@k`` and ``rm_maj@k`` —
    each a percentage over problems."""
    if not problems:
        raise ValueError("no problems to score")
    rows: dict[str, list[float]] = {"mean": [], "acc@1": [], f"pass@{k}": [], f"maj@{k}": []}
    with_rm = all(p.scores is not None for p in problems)
    if with_rm:
        rows |= {"rm@1": [], f"rm@{k}": [], f"rm_maj@{k}": []}
    for p in problems:
        n = len(p.correct)
        if n < k:
            raise ValueError(f"a problem has {n} samples, fewer than k={k}")
        groups = group_answers(p.answers, equal)
        rows["mean"].append(sum(p.correct) / n)
        rows["acc@1"].append(float(p.correct[0]))
        rows[f"pass@{k}"].append(pass_at_k(n, sum(p.correct), k))
        rows[f"maj@{k}"].append(maj_at_k(p.answers, p.correct, k, groups=groups))
        if with_rm:
            assert p.scores is not None
            rows["rm@1"].append(rm_at_k(p.correct, p.scores, 1))
            rows[f"rm@{k}"].append(rm_at_k(p.correct, p.scores, k))
            rows[f"rm_maj@{k}"].append(
                weighted_maj_at_k(p.answers, p.correct, p.scores, k, groups=groups)
            )
    return {name: 100.0 * sum(v) / len(v) for name, v in rows.items()}
