"""All eight AutoIF stages in order, each resumable, with per-stage yield and seconds.

``run_autoif`` runs the named ``stages`` (all by default) over a work folder; each stage reads
the files of the stages before it, skips what its own file already holds, and appends the
rest, so a killed run continues where it stopped. ``stats.json`` keeps the last counts and
seconds of every stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.backtranslate import Judge, stage_backtranslate
from tirforge.agent.pipelines.autoif.common import Paths
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.crossval import stage_crossval
from tirforge.agent.pipelines.autoif.export import stage_export
from tirforge.agent.pipelines.autoif.instructions import (
    load_seeds,
    stage_augment,
    stage_seeds,
    stage_verifiers,
)
from tirforge.agent.pipelines.autoif.responses import (
    load_queries,
    stage_queries,
    stage_responses,
)
from tirforge.agent.pipelines.autoif.sandbox import AUTOIF_PRELOAD

STAGES = ("seeds", "augment", "verifiers", "crossval", "backtranslate", "queries",
          "responses", "export")
NEEDS_MODEL = {"augment", "verifiers", "backtranslate", "responses"}
NEEDS_KERNEL = {"crossval", "responses"}


def verifier_pool(executor: Any = None, size: int = 1, cfg: AutoIFConfig | None = None) -> Any:
    """A started KernelPool for verifiers: ``executor`` (an ExecutorConfig; local bwrap by
    default) with the light AutoIF preload and an output cap above the flood limit."""
    from dataclasses import replace

    from tirforge.executors import ExecutorConfig, KernelPool

    cfg = cfg or AutoIFConfig()
    ex = executor or ExecutorConfig()
    ex = replace(ex, preload=AUTOIF_PRELOAD, pool_size=size,
                 max_output_chars=max(ex.max_output_chars, 2 * cfg.max_output_chars))
    return KernelPool(ex, size=size).start()


def run_autoif(
    workdir: str | Path,
    *,
    cfg: AutoIFConfig | None = None,
    backend: Any = None,
    pool: Any = None,
    stages: Sequence[str] = STAGES,
    seeds: Path | None = None,
    seed_limit: int | None = None,
    queries: str | Path | None = None,
    query_field: str = "query",
    model: str = "",
    judge: Judge | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``stages`` in pipeline order; returns (and writes to ``stats.json``) per stage its
    counts and ``seconds``. ``backend`` is needed by the model stages and ``pool`` (a started
    KernelPool) by crossval/responses; raises ValueError naming a missing one or an unknown
    stage before anything runs."""
    cfg = cfg or AutoIFConfig()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    if backend is None and NEEDS_MODEL & set(stages):
        raise ValueError(f"stages {sorted(NEEDS_MODEL & set(stages))} need a model backend")
    if pool is None and NEEDS_KERNEL & set(stages):
        raise ValueError(f"stages {sorted(NEEDS_KERNEL & set(stages))} need a kernel pool")
    paths = Paths(Path(workdir))
    paths.root.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = json.loads(paths.stats.read_text()) if paths.stats.exists() else {}
    for name in (s for s in STAGES if s in stages):
        t0 = time.perf_counter()
        if name == "seeds":
            out = stage_seeds(paths, load_seeds(seeds, seed_limit))
        elif name == "augment":
            out = stage_augment(paths, backend, cfg)
        elif name == "verifiers":
            out = stage_verifiers(paths, backend, cfg)
        elif name == "crossval":
            out = stage_crossval(paths, pool, cfg)
        elif name == "backtranslate":
            if not cfg.backtranslate:
                continue
            out = stage_backtranslate(paths, backend, cfg, judge)
        elif name == "queries":
            out = stage_queries(paths, load_queries(queries, query_field), cfg)
        elif name == "responses":
            out = stage_responses(paths, backend, pool, cfg, model)
        else:
            out = stage_export(paths, cfg, model)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        stats[name] = out
        tmp = paths.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(paths.stats)  # readers see the old or the new stats, whole
        if log:
            log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in out.items()))
    return stats


__all__ = ["STAGES", "jsonl", "run_autoif", "verifier_pool"]
