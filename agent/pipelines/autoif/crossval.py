"""Stage 4: cross-validate each instruction's functions against its cases, in the sandbox."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.common import Paths
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.parse import canonical_source
from tirforge.agent.pipelines.autoif.sandbox import FunctionRun, run_functions


@dataclass
class Verdict:
    """What cross-validation decided for one instruction."""

    kept: bool
    reason: str
    functions: list[str]
    """Sources of the kept functions (accuracy >= threshold)."""
    cases: list[tuple[str, bool]]
    """Cases the majority of kept functions agree with."""
    accuracy: list[float]
    """Per distinct runnable function, agreement with all cases (same order as ``statuses``)."""
    statuses: list[str]


def pool_cases(drafts: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, bool]]]:
    """Distinct functions (by canonical source) and distinct cases of all drafts; a response
    that two drafts label differently is dropped (its label is unknown)."""
    funcs: dict[str, str] = {}
    labels: dict[str, set[bool]] = {}
    for d in drafts:
        funcs.setdefault(canonical_source(d["function"]), d["function"])
        for text, want in d["cases"]:
            labels.setdefault(text, set()).add(bool(want))
    cases = [(t, next(iter(v))) for t, v in labels.items() if len(v) == 1]
    return list(funcs.values()), cases


def decide(runs: list[FunctionRun], sources: list[str], cases: list[tuple[str, bool]],
           cfg: AutoIFConfig) -> Verdict:
    """AutoIF's filter on the result matrix: a function is kept when it agrees with the cases
    at >= ``min_accuracy`` (a call that raised counts as a disagreement); a case is kept when
    more than half of the kept functions agree with it; the instruction is kept when at least
    ``min_functions`` functions and ``min_cases`` cases remain."""
    want = [w for _, w in cases]
    acc = [sum(r is w for r, w in zip(run.results, want, strict=True)) / len(cases)
           if run.ok and cases else 0.0 for run in runs]
    keep_f = [i for i, a in enumerate(acc) if a >= cfg.min_accuracy and runs[i].ok]
    keep_c = [c for j, c in enumerate(cases)
              if keep_f and sum(runs[i].results[j] is c[1] for i in keep_f) * 2 > len(keep_f)]
    if len(keep_f) < cfg.min_functions:
        reason = f"{len(keep_f)} functions with accuracy >= {cfg.min_accuracy} " \
                 f"(< {cfg.min_functions})"
    elif len(keep_c) < cfg.min_cases:
        reason = f"{len(keep_c)} agreed cases (< {cfg.min_cases})"
    else:
        reason = "ok"
    return Verdict(reason == "ok", reason, [sources[i] for i in keep_f], keep_c, acc,
                   [r.status for r in runs])


def stage_crossval(paths: Paths, pool: Any, cfg: AutoIFConfig) -> dict[str, int]:
    """Run every distinct function on every case (one kernel per instruction, reset between
    functions), decide, and append one record per instruction."""
    done = jsonl.done_ids(paths.crossval)
    with jsonl.Appender(paths.crossval) as out:
        for rec in jsonl.read(paths.verifiers):
            if rec["id"] in done:
                continue
            sources, cases = pool_cases(rec["drafts"])
            runs = run_functions(pool, sources, [t for t, _ in cases], timeout=cfg.cell_timeout,
                                 max_output_chars=cfg.max_output_chars) if cases else \
                [FunctionRun(status="no cases") for _ in sources]
            v = decide(runs, sources, cases, cfg)
            out.add({"id": rec["id"], "instruction": rec["instruction"], "kept": v.kept,
                     "reason": v.reason, "functions": v.functions, "cases": v.cases,
                     "accuracy": v.accuracy, "statuses": v.statuses,
                     "n_functions": len(sources), "n_cases": len(cases)})
    recs = jsonl.read(paths.crossval)
    statuses = [s for r in recs for s in r["statuses"]]
    return {"instructions": len(recs), "kept": sum(r["kept"] for r in recs),
            "functions": len(statuses),
            "functions_contained": sum(s not in ("ok", "no cases") for s in statuses),
            "functions_kept": sum(len(r["functions"]) for r in recs if r["kept"])}
