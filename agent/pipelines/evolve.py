"""Evolve-and-label: rewrite seed problems into new ones (MuggleMath / DotaMath types), then
label each new problem by the consensus of sampled TIR solutions.

``run_evolve`` is the one sequence ``tirforge evolve`` and the loop's evolve stage both run; they
differ only in how the labelling samples are collected (``Collect``), which rewrites are kept
and whether an earlier run's rewrites are reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from tirforge.trajectories.datasets import Problem
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store, config_hash

Collect = Callable[[list[Problem], int], list[Trajectory]]
"""(problems, samples per problem) -> the graded trajectories of those problems."""


def run_evolve(
    seeds: Sequence[Problem],
    generate: Callable[[list[str]], list[str]],
    collect: Collect,
    *,
    label_samples: int,
    types: Sequence[str] | None = None,
    per_type: int = 1,
    threshold: float = 0.5,
    batch_size: int = 16,
    keep: Callable[[list[Problem]], list[Problem]] | None = None,
    generated: tuple[list[Problem], dict[str, Any]] | None = None,
    on_generated: Callable[[list[Problem], dict[str, Any]], None] | None = None,
) -> tuple[list[Problem], dict[str, Any]]:
    """Rewrite ``seeds`` with ``generate`` (prompts -> texts), then label every new problem by
    the consensus of ``label_samples`` TIR answers (``collect``); agreement below ``threshold``
    leaves it unlabelled (reference None). ``keep`` filters / renames the rewrites before
    labelling (e.g. drop ones that reproduce a held-out problem); ``on_generated(problems,
    stats)`` sees them before labelling starts (to keep them: rewriting samples), and
    ``generated`` = those (problems, stats) from an earlier run skips the rewriting. Returns
    (new problems, labelled when ``label_samples`` > 0; stats: the rewrite counts, ``seeds``,
    ``new``, ``accepted``)."""
    from tirforge.trajectories.evolve import EVOLVE_TYPES, EvolveConfig, evolve, label

    if generated is None:
        made, erep = evolve(seeds, generate, EvolveConfig(
            types=list(types or EVOLVE_TYPES), per_type=per_type, batch_size=max(1, batch_size)))
        new = keep(made) if keep is not None else made
        stats: dict[str, Any] = {**asdict(erep), "seeds": len(seeds),
                                 "dropped_overlap": len(made) - len(new)}
        if on_generated is not None:
            on_generated(new, stats)
    else:
        new, stats = generated
    labelled = new
    if label_samples > 0 and new:
        answers: dict[str, list[str | None]] = {p.id: [] for p in new}
        for t in collect(list(new), label_samples):
            if (t.problem_id or "") in answers:
                answers[t.problem_id or ""].append(t.final_answer)
        labelled = [label(p, answers[p.id], threshold=threshold)[0] for p in new]
    return labelled, {**stats, "new": len(new),
                      "accepted": sum(p.reference is not None for p in labelled)}


def store_collector(store: Store, backend: Any, pool: Any, agent_cfg: Any, *,
                    model_name: str = "", concurrency: int = 1) -> Collect:
    """A ``Collect`` that runs the labelling samples into ``store`` (resumable). The problem
    texts are part of the config hash: a re-run that rewrote the seeds differently (sampling)
    reuses the ids and must not inherit the labels of the old texts."""
    from tirforge.agent.pipelines.collect import run_collect

    def collect(problems: list[Problem], samples: int) -> list[Trajectory]:
        cfg_hash = config_hash({"evolve-label": samples,
                                "problems": [(p.id, p.problem) for p in problems]})
        run_collect(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                    backend=backend, pool=pool, agent_cfg=agent_cfg, concurrency=concurrency,
                    model_name=model_name)
        return [t for t in store if t.config_hash == cfg_hash]

    return collect


def sampled_generate(backend: Any, params: Any) -> Callable[[list[str]], list[str]]:
    """``generate`` for ``run_evolve``: each prompt as one user message, one completion each."""
    from tirforge.agent.backends.base import Request

    def generate(prompts: list[str]) -> list[str]:
        reqs = [Request(messages=[{"role": "user", "content": p}]) for p in prompts]
        return [c.text for c in backend.generate(reqs, params)]

    return generate
