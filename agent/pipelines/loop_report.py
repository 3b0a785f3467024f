"""What the self-improvement loop reports: per-trajectory outcomes, the bootstrap CI of held-out
accuracy, the stage markers (``round-<r>/<stage>.done``, each holding its stage's metrics: the
source of truth), and the run's ``metrics.jsonl``, ``summary.md`` table and ``progress.png``
plot, all rebuilt from the markers."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_config import write_atomic
from tirforge.trajectories.schema import Trajectory

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop_config import LoopConfig

STAGES = ("eval", "evolve", "collect", "select", "train")
"""A round's stages, in order (the last round only evaluates)."""


# --------------------------------------------------------------------------- markers


def _marker(rd: Path, stage: str) -> Path:
    return rd / f"{stage}.done"


def read_marker(rd: Path, stage: str) -> dict | None:
    """A finished stage's metrics, or None while it has not finished."""
    path = _marker(rd, stage)
    return json.loads(path.read_text()) if path.exists() else None


def finish_stage(rd: Path, stage: str, metrics: dict) -> dict:
    """Record ``stage`` of the round in ``rd`` as finished, with its metrics (returned)."""
    write_atomic(_marker(rd, stage), json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def collect_rows(cfg: LoopConfig) -> list[dict]:
    """One row per round that has finished at least one stage, from the markers."""
    rows = []
    for r in range(cfg.rounds + 1):
        rd = cfg.run_dir / f"round-{r}"
        row: dict[str, Any] = {"round": r}
        row.update({stage: m for stage in STAGES if (m := read_marker(rd, stage)) is not None})
        if len(row) > 1:
            rows.append(row)
    return rows


def write_reports(cfg: LoopConfig) -> list[dict]:
    """Rewrite ``metrics.jsonl``, ``summary.md`` and ``progress.png`` from the markers."""
    rows = collect_rows(cfg)
    write_atomic(cfg.run_dir / "metrics.jsonl",
                 "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    write_atomic(cfg.run_dir / "summary.md", render_summary(cfg, rows))
    plot_progress(rows, cfg.run_dir / "progress.png")
    return rows


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(
    values: Sequence[float], *, samples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean of per-problem scores (0/1)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)


def outcome(t: Trajectory) -> str:
    """One failure category per trajectory: correct, incorrect, no_answer, max_turns (any budget
    ran out: turns, tokens, time) or error. A budget stop outranks a wrong last answer: the
    model had not finished."""
    if t.verdict == "correct":
        return "correct"
    if t.stop_reason == "error":
        return "error"
    if t.stop_reason in ("max_turns", "max_tokens", "max_time"):
        return "max_turns"
    if t.verdict == "incorrect":
        return "incorrect"
    return "no_answer"


def trajectory_stats(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """Outcome, verdict and stop-reason counts, mean turns."""
    return {
        "outcomes": dict(Counter(outcome(t) for t in trajs).most_common()),
        "verdicts": dict(Counter(str(t.verdict) for t in trajs).most_common()),
        "stop_reasons": dict(Counter(str(t.stop_reason) for t in trajs).most_common()),
        "mean_turns": round(sum(len(t.steps) for t in trajs) / len(trajs), 3) if trajs else 0.0,
    }


def histogram(counts: Sequence[int]) -> dict[str, int]:
    """{"0": problems with 0, "1": with 1, ...} (string keys: JSON round-trips them)."""
    c = Counter(counts)
    return {str(k): c[k] for k in range(max(c, default=0) + 1)}


# --------------------------------------------------------------------------- summary and plot


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _counts(d: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "–"


def render_summary(cfg: LoopConfig, rows: list[dict]) -> str:
    """The before/after table, then what each round's data looked like."""
    k = cfg.samples_per_problem
    ev = rows[0].get("eval") if rows else None
    def span(start: int, limit: int | None) -> str:
        return f"[{start}:{'' if limit is None else start + limit}]"

    rm = f", RM filter `{cfg.rm_filter}` >= {cfg.rm_threshold}" if cfg.rm_filter else ""
    lines = [
        f"# Self-improvement loop: {cfg.name}", "",
        f"Base model `{cfg.model}` ({cfg.backend}, {cfg.agent.format}); train {cfg.train_dataset} "
        f"{span(cfg.train_start, cfg.train_limit)}, eval {cfg.eval_dataset} "
        f"{span(cfg.eval_start, cfg.eval_limit)}"
        + (f" (de-duplicated, shuffled with seed {cfg.seed})" if cfg.shuffle else "")
        + f"; {cfg.rounds} training round{'s' * (cfg.rounds != 1)}, K = {k} at temperature "
        f"{cfg.agent.sampling.temperature}, up to "
        f"{cfg.max_per_problem} distinct paths per problem{rm}; eval greedy on "
        f"{ev['problems'] if ev else '?'} held-out problems, {cfg.ci_level:.0%} bootstrap CI.",
        "",
        "| round | model | eval acc % (CI) | trajectories | correct | distinct | kept "
        "| problems kept | SFT |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        e, c, sel, tr = (row.get(x) for x in ("eval", "collect", "select", "train"))
        acc = f"{_pct(e['accuracy'])} ({_pct(e['ci_low'])}–{_pct(e['ci_high'])})" if e else "–"
        model = (e or {}).get("model") or (c or {}).get("model") or "?"
        if tr is None:
            sft = "–"
        elif tr["skipped"]:
            sft = "**skipped: no data, model unchanged**"
        else:
            sft = f"{tr['examples']} ex × {tr['epochs']:g} ep" + (", LoRA" if tr["lora"] else "")
        lines.append(
            f"| {row['round']} | `{model}` | {acc} | {(c or {}).get('trajectories', '–')} | "
            f"{(c or {}).get('correct', '–')} | {(sel or {}).get('distinct', '–')} | "
            f"{(sel or {}).get('kept', '–')} | "
            f"{(sel or {}).get('problems_kept', '–')}/{(c or {}).get('problems', '–')} | {sft} |")
    evals = [(row["round"], row["eval"]) for row in rows if "eval" in row]
    if len(evals) > 1:
        (r0, first), (rn, last) = evals[0], evals[-1]
        delta = 100 * (last["accuracy"] - first["accuracy"])
        overlap = last["ci_low"] <= first["ci_high"] and first["ci_low"] <= last["ci_high"]
        lines += ["", f"Round {r0} → {rn}: {delta:+.1f} points"
                  + (" (the CIs overlap: not a clear change)." if overlap else
                     " (the CIs do not overlap).")]
    lines += ["", "## What each round's data looked like", ""]
    for row in rows:
        lines.append(f"### Round {row['round']}")
        if e := row.get("eval"):
            lines.append(f"- eval outcomes: {_counts(e['outcomes'])}; stop reasons: "
                         f"{_counts(e['stop_reasons'])}; mean turns {e['mean_turns']}"
                         + (f"; {e['failed']} failed jobs" if e["failed"] else "")
                         + f" ({e['seconds']:.0f} s)")
        if ev := row.get("evolve"):
            lines.append(f"- evolve: {ev.get('requested', 0)} rewrites asked, {ev['new']} new "
                         f"problems, {ev['accepted']} accepted by consensus")
        if c := row.get("collect"):
            lines.append(
                f"- collection: {c['trajectories']} trajectories on {c['problems']} problems; "
                f"pass@1 {_pct(c['pass@1'])}"
                + (f", pass@{k} {_pct(c.get(f'pass@{k}'))}, maj@{k} {_pct(c.get(f'maj@{k}'))}"
                   if k > 1 else "")
                + f"; mean turns {c['mean_turns']}"
                + (f"; {c['failed']} failed jobs" if c["failed"] else "")
                + f" ({c['seconds']:.0f} s)")
            lines.append(f"- collection outcomes: {_counts(c['outcomes'])}; stop reasons: "
                         f"{_counts(c['stop_reasons'])}")
            lines.append("- correct samples per problem (count: problems): "
                         + _counts(c["correct_per_problem"]))
        if sel := row.get("select"):
            ratio = "–" if sel["dedup_ratio"] is None else f"{sel['dedup_ratio']:.2f}"
            lines.append(
                f"- selection: {sel['correct']} correct → {sel['distinct']} distinct paths "
                f"(dedup ratio {ratio}; {sel['duplicates']} duplicates"
                + (f", {sel['below_score']} below the RM threshold" if cfg.rm_filter else "")
                + f") → {sel['kept']} kept ({sel['capped']} over the per-problem cap), from "
                f"{sel['problems_kept']} of {sel['problems']} problems")
            lines.append("- kept paths per problem (count: problems): "
                         + _counts(sel["kept_per_problem"]))
        if tr := row.get("train"):
            lines.append(f"- SFT: {tr['reason']}" if tr["skipped"] else
                         f"- SFT: {tr['examples']} examples from the {tr['init']} model → "
                         f"`{tr['model']}`" + (" (reused a finished save)" if tr["reused"] else
                                               f" ({tr['seconds']:.0f} s)"))
        lines.append("")
    return "\n".join(lines)


def plot_progress(rows: list[dict], path: Path) -> None:
    """Accuracy with CI error bars and selected-data size, per round (Agg: no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global backend state
    ax_acc, ax_data = fig.subplots(1, 2)
    ev = [(row["round"], row["eval"]) for row in rows if "eval" in row]
    if ev:
        xs = [r for r, _ in ev]
        ys = [100 * e["accuracy"] for _, e in ev]
        err = [[y - 100 * e["ci_low"] for y, (_, e) in zip(ys, ev, strict=True)],
               [100 * e["ci_high"] - y for y, (_, e) in zip(ys, ev, strict=True)]]
        ax_acc.errorbar(xs, ys, yerr=err, marker="o", capsize=4)
        ax_acc.set_xticks(xs)
    ax_acc.set_xlabel("round (model r)")
    ax_acc.set_ylabel("held-out accuracy, % (95% CI)")
    ax_acc.set_title("greedy eval")
    sel = [(row["round"], row["select"]) for row in rows if "select" in row]
    if sel:
        xs = [r for r, _ in sel]
        ax_data.bar([x - 0.2 for x in xs], [m["correct"] for _, m in sel], width=0.4,
                    label="correct trajectories")
        ax_data.bar([x + 0.2 for x in xs], [m["kept"] for _, m in sel], width=0.4,
                    label="distinct kept (SFT data)")
        ax_data.set_xticks(xs)
        ax_data.set_xlim(min(xs) - 0.8, max(xs) + 0.8)  # one round: bars, not a filled axis
        ax_data.legend(fontsize=8)
    ax_data.set_xlabel("round")
    ax_data.set_ylabel("trajectories")
    ax_data.set_title("selected data")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
