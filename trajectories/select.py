"""Choosing training data from collected trajectories.

- ``select_distinct``: rejection sampling with distinct reasoning paths (RFT, Yuan et al. 2023):
  keep correct trajectories and drop those whose normalised code / equation sequence repeats one
  already kept for the same problem.
- ``dpo_pairs``: correct vs incorrect trajectories of the same problem; an attempt that failed
  for the machinery's sake (a cell hit an infrastructure fault: the kernel died or did not
  start) is never a rejected side, since it says nothing about the model.
- ``consensus``: majority-vote label for a problem without a reference answer.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tirforge.trajectories.faults import has_infra_fault
from tirforge.trajectories.grading import answers_equal, normalize
from tirforge.trajectories.schema import Trajectory

__all__ = [
    "Consensus",
    "SelectConfig",
    "consensus",
    "dpo_pairs",
    "path_signature",
    "select_distinct",
]

_BUILTINS = set(dir(builtins))


class _Canon(ast.NodeTransformer):
    """Rename user variables to v0, v1, ... in order of first use: names carry no reasoning."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.modules: set[str] = set()

    def _rename(self, name: str) -> str:
        if name in _BUILTINS or name in self.modules:
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_Import(self, node: ast.Import) -> ast.AST:
        self.modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        self.modules.update(a.asname or a.name for a in node.names)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self._rename(node.id)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg = self._rename(node.arg)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = self._rename(node.name)
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
            getattr(node.body[0], "value", None), ast.Constant
        ):
            node.body = node.body[1:] or [ast.Pass()]  # docstrings are prose
        self.generic_visit(node)
        return node


def _canonical_code(cells: list[str]) -> str:
    canon = _Canon()  # one renamer for all cells: the kernel state carries names across
    out = []
    for cell in cells:
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            out.append(re.sub(r"\s+", " ", re.sub(r"#[^\n]*", "", cell)).strip())
            continue
        out.append(ast.unparse(canon.visit(tree)))  # drops comments and layout
    return "\n#cell\n".join(out)


# "16 - 3 - 4 = 9", "<<9*2=18>>": a calculation with its result (RFT's equation list).
_EQUATION_RE = re.compile(
    r"([\d.\s+\-*/×÷()^]+[+\-*/×÷^][\d.\s+\-*/×÷()^]*)=\s*(-?\d[\d,]*(?:\.\d+)?)"
)


def path_signature(traj: Trajectory) -> str:
    """What makes a reasoning path distinct: its executed code, else its equation sequence."""
    if traj.code_cells:
        return "code:" + _canonical_code(traj.code_cells)
    text = "".join(s.text for s in traj.steps)
    eqs = [re.sub(r"\s+", "", a) + "=" + b.replace(",", "") for a, b in _EQUATION_RE.findall(text)]
    if eqs:
        return "eq:" + "|".join(eqs)
    return "text:" + re.sub(r"\s+", " ", text).strip().lower()


def _group(trajs: Iterable[Trajectory]) -> dict[str, list[Trajectory]]:
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        groups[t.problem_id or t.problem].append(t)
    return groups


@dataclass
class SelectConfig:
    """Which correct trajectories become SFT data."""

    max_per_problem: int | None = 4
    """Keep at most this many distinct paths per problem (None: all)."""
    min_score: float | None = None
    """Drop trajectories whose reward-model ``score`` is below this (unscored ones are kept)."""
    dedup: bool = True
    """Drop trajectories whose reasoning path repeats one already kept (RFT)."""


@dataclass
class SelectReport:
    problems: int = 0
    trajectories: int = 0
    correct: int = 0
    below_score: int = 0
    duplicates: int = 0
    capped: int = 0
    kept: int = 0
    problems_kept: int = 0


def select_distinct(
    trajs: Iterable[Trajectory], config: SelectConfig | None = None
) -> tuple[list[Trajectory], SelectReport]:
    """Correct, distinct trajectories per problem; the report counts what was dropped why.

    Several runs / models can simply be concatenated: a path found by two of them is kept once.
    Within a problem the higher-scored (then shorter) trajectory of a duplicate pair is kept.
    """
    cfg = config or SelectConfig()
    rep = SelectReport()
    kept: list[Trajectory] = []
    for group in _group(trajs).values():
        rep.problems += 1
        rep.trajectories += len(group)
        good = [t for t in group if t.verdict == "correct"]
        rep.correct += len(good)
        if cfg.min_score is not None:
            ok = [t for t in good if t.score is None or t.score >= cfg.min_score]
            rep.below_score += len(good) - len(ok)
            good = ok
        good.sort(key=lambda t: (-(t.score if t.score is not None else 0.0), len(t.steps)))
        seen: set[str] = set()
        chosen = []
        for t in good:
            sig = path_signature(t) if cfg.dedup else t.id
            if sig in seen:
                rep.duplicates += 1
                continue
            seen.add(sig)
            if cfg.max_per_problem is not None and len(chosen) >= cfg.max_per_problem:
                rep.capped += 1
                continue
            chosen.append(t)
        kept.extend(chosen)
        rep.problems_kept += bool(chosen)
    rep.kept = len(kept)
    return kept, rep


def dpo_pairs(
    trajs: Iterable[Trajectory], *, max_pairs_per_problem: int = 4
) -> list[tuple[Trajectory, Trajectory]]:
    """(chosen, rejected) pairs: distinct correct paths vs incorrect / unanswered attempts."""
    pairs = []
    for group in _group(trajs).values():
        good, _ = select_distinct(group, SelectConfig(max_per_problem=None))
        bad = [t for t in group if t.verdict in ("incorrect", "no_answer", "unparseable")
               and not has_infra_fault(t)]
        # Walk the diagonals of good x bad: pairs are unique and spread over both sides.
        combos = [
            (good[i], bad[(i + d) % len(bad)]) for d in range(len(bad)) for i in range(len(good))
        ]
        pairs.extend(combos[:max_pairs_per_problem])
    return pairs


@dataclass
class Consensus:
    """Majority vote over sampled final answers."""

    answer: str | None
    """The most common answer (equivalent answers pooled), None if nobody answered."""
    votes: int
    total: int
    """Samples voted, unanswered ones included: they count against agreement."""
    agreement: float
    accepted: bool
    """``agreement >= threshold`` and at least ``min_votes`` votes."""
    counts: dict[str, int] = field(default_factory=dict)


def consensus(
    answers: Iterable[str | None], *, threshold: float = 0.5, min_votes: int = 2
) -> Consensus:
    """Pool equivalent answers (``answers_equal``) and take the largest pool."""
    answers = list(answers)
    pools: list[tuple[str, int]] = []  # (representative, votes)
    by_norm: dict[str, int] = {}  # normalised string -> pool index: skips most comparisons
    for a in answers:
        if a is None or not a.strip():
            continue
        n = normalize(a)
        idx = by_norm.get(n)
        if idx is None:
            idx = next((i for i, (rep, _) in enumerate(pools) if answers_equal(a, rep)), None)
        if idx is None:
            pools.append((a, 0))
            idx = len(pools) - 1
        by_norm[n] = idx
        pools[idx] = (pools[idx][0], pools[idx][1] + 1)
    total = len(answers)
    if not pools:
        return Consensus(None, 0, total, 0.0, False)
    best, votes = max(pools, key=lambda p: p[1])  # ties: the earliest answer wins
    agreement = votes / total
    return Consensus(
        best, votes, total, agreement, agreement >= threshold and votes >= min_votes,
        counts=dict(pools),
    )
