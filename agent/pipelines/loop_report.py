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

STAGES = ("eval", "sample", "evolve", "collect", "rm", "select", "train")
"""A round's stages, in order (the last round only evaluates)."""
RL_STAGES = ("filter", "train", "eval", "sample")
"""The RL stage's steps (``<run>/rl/``), in order."""


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
    rl: dict[str, Any] = {"round": "rl"}
    rl.update({st: m for st in RL_STAGES if (m := read_marker(cfg.run_dir / "rl", st))})
    return rows + ([rl] if len(rl) > 1 else [])


def write_reports(cfg: LoopConfig) -> list[dict]:
    """Rewrite ``metrics.jsonl``, ``summary.md`` and ``progress.png`` from the markers."""
    rows = collect_rows(cfg)
    write_atomic(cfg.run_dir / "metrics.jsonl",
                 "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    write_atomic(cfg.run_dir / "summary.md", render_summary(cfg, rows))
    plot_progress(rows, cfg.run_dir / "progress.png", cfg.infer.n)
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
    rounds = [row for row in rows if row["round"] != "rl"]
    for row in rounds:
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
    lines += coevolution_lines(cfg, rows)
    if len(evals) > 1:
        (r0, first), (rn, last) = evals[0], evals[-1]
        delta = 100 * (last["accuracy"] - first["accuracy"])
        overlap = last["ci_low"] <= first["ci_high"] and first["ci_low"] <= last["ci_high"]
        lines += ["", f"Round {r0} → {rn}: {delta:+.1f} points"
                  + (" (the CIs overlap: not a clear change)." if overlap else
                     " (the CIs do not overlap).")]
    lines += ["", "## What each round's data looked like", ""]
    for row in rounds:
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
            if v := sel.get("vs_rft"):
                lines.append(
                    f"- RM-guided selection (`{sel['rm']}`, top {sel['top_k']}, floor "
                    f"{sel['min_score']}): {v['rm_kept']} kept vs {v['rft_kept']} by RFT alone; "
                    f"{v['both']} in both, {v['added']} added, {v['dropped']} dropped, "
                    f"{v['problems_changed']} problems changed")
        if rm := row.get("rm"):
            lines.append(f"- RM: {rm['reason']}" if rm["skipped"] else
                         f"- RM: `{rm['model']}` ({rm['loss']}, warm-started from "
                         f"{'the previous RM' if rm['init'] == 'previous' else 'the policy'}) on "
                         f"{rm['problems']} held-in problems with both verdicts; AUC held-out "
                         f"{_num(rm['auc_held_out'])}, held-in {_num(rm['auc_held_in'])}"
                         + ("" if rm["reused"] else f" ({rm['seconds']:.0f} s)"))
        if tr := row.get("train"):
            lines.append(f"- SFT: {tr['reason']}" if tr["skipped"] else
                         f"- SFT: {tr['examples']} examples from the {tr['init']} model → "
                         f"`{tr['model']}`" + (" (reused a finished save)" if tr["reused"] else
                                               f" ({tr['seconds']:.0f} s)"))
        lines.append("")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _rm_at(row: dict, n: int) -> tuple[float | None, str | None]:
    """RM@N of a row and the RM that picked: the round's own RM, else the sample stage's."""
    for st in ("rm", "sample"):
        m = row.get(st) or {}
        if f"rm@{n}" in m:
            return m[f"rm@{n}"], m.get("rm") if st == "sample" else m.get("model")
    return None, None


def coevolution_lines(cfg: LoopConfig, rows: list[dict]) -> list[str]:
    """The report-style table (greedy, maj@N, RM@N per round and for the RL model, RM AUC,
    data kept) and the RL stage's lines; nothing when no co-evolution section is on."""
    n = cfg.infer.n
    if not (n or cfg.rm.enabled or cfg.rl.enabled):
        return []
    lines = ["", "## Policy and reward model, per round", "",
             f"| round | policy | greedy % | maj@{n} % | RM@{n} % | RM (AUC held-out) "
             "| kept (RFT alone) |", "|---|---|---:|---:|---:|---|---:|"]
    for row in rows:
        if row["round"] == "rl" and "eval" not in row:
            continue  # RL skipped (or not evaluated yet): no RL model to show
        e, smp, rm, sel = (row.get(x) or {} for x in ("eval", "sample", "rm", "select"))
        rm_at, picker = _rm_at(row, n)
        own = f"`{rm['model']}` ({_num(rm.get('auc_held_out'))})" if rm.get("model") else "–"
        kept = "–" if not sel else f"{sel['kept']}" + (
            f" ({sel['vs_rft']['rft_kept']})" if "vs_rft" in sel else "")
        lines.append(
            f"| {row['round']} | `{e.get('model', '?')}` | {_pct(e.get('accuracy'))} | "
            f"{_pct(smp.get(f'maj@{n}'))} | {_pct(rm_at)}"
            + (f" (`{picker}`)" if picker and not rm.get("model") else "")
            + f" | {own} | {kept} |")
    rl = next((row for row in rows if row["round"] == "rl"), {})
    if f := rl.get("filter"):
        lines += ["", f"RL: {f['kept']} of {f['problems']} training problems had "
                  f"{f['range'][0]}-{f['range'][1]} of {cfg.rl.samples} samples correct "
                  f"(`{f['model']}`; correct per problem: {_counts(f['correct_per_problem'])})."]
    if tr := rl.get("train"):
        curve = [p["reward"] for p in tr.get("rewards", [])]
        lines.append(f"RL: {tr['reason']}" if tr["skipped"] else
                     f"RL: GRPO from `{tr['init']}` on {tr['problems']} problems, reward "
                     f"r = σ({tr['alpha']}·r_m) + (r_v − 1) with `{tr['rm']}`" if tr["rm"] else
                     f"RL: GRPO from `{tr['init']}` on {tr['problems']} problems, r = r_v")
        if curve:
            lines.append(f"RL reward per logged step: {' → '.join(f'{x:.3f}' for x in curve)}")
    return lines


def plot_progress(rows: list[dict], path: Path, n: int = 0) -> None:
    """Per round: accuracy (greedy with CI error bars, maj@N, RM@N; the RL model as the last
    point), selected-data size with the RM's held-out AUC, and the RL reward curve (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rl = next((row for row in rows if row["round"] == "rl"), {})
    curve = (rl.get("train") or {}).get("rewards") or []
    fig = Figure(figsize=(13.5 if curve else 9, 3.6), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global backend state
    axes = fig.subplots(1, 3 if curve else 2)
    ax_acc, ax_data = axes[0], axes[1]
    ints = [row["round"] for row in rows if row["round"] != "rl"]
    x_of = {r: r for r in ints} | {"rl": max(ints, default=0) + 1}
    ev = [(x_of[row["round"]], row["eval"]) for row in rows if "eval" in row]
    if ev:
        xs = [x for x, _ in ev]
        ys = [100 * e["accuracy"] for _, e in ev]
        err = [[y - 100 * e["ci_low"] for y, (_, e) in zip(ys, ev, strict=True)],
               [100 * e["ci_high"] - y for y, (_, e) in zip(ys, ev, strict=True)]]
        ax_acc.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="greedy")
        for name, get in ((f"maj@{n}", lambda row: (row.get("sample") or {}).get(f"maj@{n}")),
                          (f"RM@{n}", lambda row: _rm_at(row, n)[0])):
            pts = [(x_of[row["round"]], 100 * v) for row in rows if (v := get(row)) is not None]
            if n and pts:
                ax_acc.plot(*zip(*pts, strict=True), marker="s", label=name)
        ax_acc.set_xticks(xs, ["RL" if rl and x == x_of["rl"] else str(x) for x in xs])
        ax_acc.legend(fontsize=8)
    ax_acc.set_xlabel("round (model r)")
    ax_acc.set_ylabel("held-out accuracy, % (95% CI)")
    ax_acc.set_title("policy")
    sel = [(row["round"], row["select"]) for row in rows if "select" in row]
    if sel:
        xs = [r for r, _ in sel]
        ax_data.bar([x - 0.2 for x in xs], [m["correct"] for _, m in sel], width=0.4,
                    label="correct trajectories")
        ax_data.bar([x + 0.2 for x in xs], [m["kept"] for _, m in sel], width=0.4,
                    label="distinct kept (SFT data)")
        rft = [(r, m["vs_rft"]["rft_kept"]) for r, m in sel if "vs_rft" in m]
        if rft:  # what RFT alone would have kept, next to the RM-guided bar
            ax_data.scatter([r + 0.2 for r, _ in rft], [k for _, k in rft], marker="_",
                            s=400, color="black", label="kept by RFT alone", zorder=3)
        ax_data.set_xticks(xs)
        ax_data.set_xlim(min(xs) - 0.8, max(xs) + 0.8)  # one round: bars, not a filled axis
        ax_data.legend(fontsize=8, loc="upper left")
        aucs = [(row["round"], a) for row in rows
                if (a := (row.get("rm") or {}).get("auc_held_out")) is not None]
        if aucs:
            twin = ax_data.twinx()
            twin.plot(*zip(*aucs, strict=True), color="black", marker="^", label="RM AUC")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("RM AUC (held-out)")
            twin.legend(fontsize=8, loc="upper right")
    ax_data.set_xlabel("round")
    ax_data.set_ylabel("trajectories")
    ax_data.set_title("selected data, reward model")
    if curve:
        ax_rl = axes[2]
        ax_rl.plot([p["step"] for p in curve], [p["reward"] for p in curve], marker=".")
        ax_rl.set_xlabel("GRPO step")
        ax_rl.set_ylabel("mean shaped reward")
        ax_rl.set_title("RL")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
