"""Query evolution: an LLM rewrites seed problems into new ones (MuggleMath / DotaMath style).

The augmentation types are prompt files in ``prompts/evolve/`` (one per type, plus a shared
``_header.txt``), so prompts change without touching code. The model is any
``generate(prompts) -> texts`` function: this module never imports the agent (apps wire it up).
New problems carry provenance (seed id, type) and no reference; ``label`` gives them a consensus
answer from sampled TIR solutions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tirforge.trajectories.datasets import Problem
from tirforge.trajectories.select import Consensus, consensus

__all__ = ["EVOLVE_TYPES", "EvolveConfig", "build_prompt", "evolve", "label", "parse_new_problem"]

PROMPT_DIR = Path(__file__).parent / "prompts" / "evolve"
EVOLVE_TYPES: tuple[str, ...] = tuple(
    sorted(p.stem for p in PROMPT_DIR.glob("*.txt") if not p.stem.startswith("_"))
)
"""MuggleMath's change_numbers / fractions_percent / add_condition / combine_concepts / reverse,
plus fuzzify and DotaMath-style ``dotamath_evolve``."""

Generate = Callable[[list[str]], list[str]]


@dataclass
class EvolveConfig:
    """How seeds are rewritten."""

    types: Sequence[str] = EVOLVE_TYPES
    """Augmentation types to apply to every seed (names of files in prompts/evolve)."""
    per_type: int = 1
    """New problems requested per seed and type."""
    min_chars: int = 20
    """Rewrites shorter than this are dropped as failed generations."""
    batch_size: int = 16
    """Prompts handed to ``generate`` per call."""


def build_prompt(seed: Problem, kind: str) -> str:
    """The full prompt for rewriting ``seed`` with augmentation ``kind``."""
    path = PROMPT_DIR / f"{kind}.txt"
    if not path.exists():
        raise ValueError(f"unknown evolution type {kind!r}; known: {', '.join(EVOLVE_TYPES)}")
    text = (PROMPT_DIR / "_header.txt").read_text() + path.read_text()
    # replace, not str.format: problems are full of LaTeX braces.
    return text.replace("{problem}", seed.problem).replace("{answer}", seed.reference or "?")


_MARKER_RE = re.compile(
    r"^\s*(?:#+\s*)?\**\s*new (?:problem|question)\s*\**\s*:\s*\**", re.I | re.M
)


def parse_new_problem(text: str) -> str | None:
    """The new problem in a generation: after the last "New problem:" marker, if any."""
    marks = list(_MARKER_RE.finditer(text))
    body = text[marks[-1].end() :] if marks else text
    # Models often go on to solve it: cut at a solution / answer heading.
    body = re.split(r"\n\s*(?:\**\s*(?:solution|answer)\b)", body, maxsplit=1, flags=re.I)[0]
    body = body.strip().strip("*").strip()
    return body or None


@dataclass
class EvolveReport:
    requested: int = 0
    produced: int = 0
    dropped: int = 0
    """Empty, too short or identical to the seed."""


def evolve(
    seeds: Sequence[Problem], generate: Generate, config: EvolveConfig | None = None
) -> tuple[list[Problem], EvolveReport]:
    """New unlabelled problems with ``meta`` = {seed_id, seed_problem, type}.

    Ids are ``<seed id>/<type>/<n>``, so a re-run gives the same ids (and resumes labelling).
    """
    cfg = config or EvolveConfig()
    jobs = [(s, k, n) for s in seeds for k in cfg.types for n in range(cfg.per_type)]
    prompts = [build_prompt(s, k) for s, k, _ in jobs]  # builds every prompt: bad types fail early
    rep = EvolveReport(requested=len(jobs))
    out: list[Problem] = []
    for start in range(0, len(jobs), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        texts = generate(batch)
        if len(texts) != len(batch):
            raise RuntimeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
        for (seed, kind, n), text in zip(jobs[start : start + cfg.batch_size], texts, strict=True):
            new = parse_new_problem(text or "")
            if new is None or len(new) < cfg.min_chars or new.strip() == seed.problem.strip():
                rep.dropped += 1
                continue
            meta = {"seed_id": seed.id, "seed_problem": seed.problem, "type": kind}
            out.append(Problem(id=f"{seed.id}/{kind}/{n}", problem=new, reference=None, meta=meta))
    rep.produced = len(out)
    return out, rep


def label(
    problem: Problem, answers: Sequence[str | None], *, threshold: float = 0.5, min_votes: int = 2
) -> tuple[Problem, Consensus]:
    """``problem`` with its consensus answer as reference when accepted; the vote is recorded."""
    vote = consensus(answers, threshold=threshold, min_votes=min_votes)
    meta = {
        **problem.meta,
        "consensus": {
            "answer": vote.answer,
            "votes": vote.votes,
            "total": vote.total,
            "agreement": round(vote.agreement, 4),
            "accepted": vote.accepted,
            "threshold": threshold,
        },
    }
    ref = vote.answer if vote.accepted else None
    return Problem(problem.id, problem.problem, ref, meta), vote
