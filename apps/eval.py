"""``tirforge eval``: the Qwen2.5-Math evaluation protocol on the shared benchmarks.

For each benchmark: one greedy run (temperature 0, one sample) and, with ``--n N > 1``, N
sampled trajectories per problem; both go to resumable stores (same store as collection), so an
interrupted evaluation picks up where it stopped. The table has one row per benchmark — greedy,
maj@N, RM@N (with ``--rm``), pass@N — plus the average, as rich table, Markdown and JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    benchmarks: list[str]
    """Registered dataset names (see ``tirforge.trajectories.datasets.DATASETS``)."""
    model: str = "smollm2"
    format: str = "qwen-tir"
    n: int = 1
    """Samples per problem for maj@N / RM@N / pass@N (1: greedy only)."""
    temperature: float = 0.7
    """Sampling temperature of the N samples (Qwen2.5-Math's evaluation uses 0.7)."""
    top_p: float = 0.8
    limit: int | None = None
    """First N problems of each benchmark only."""
    max_turns: int = 6
    max_new_tokens: int = 1024
    timeout: float = 10.0
    concurrency: int = 4
    """Trajectories in flight."""
    out: Path = Path("runs/eval")
    rm: str | None = None
    """Reward model folder (``tirforge train rm``) for RM@N and RM-weighted majority."""
    search_beam: int = 0
    """With > 0: also run RM-guided step search (beam width B = this, M = ``n`` continuations
    per kept trajectory per step, scored by ``rm`` or, without one, execution heuristics);
    its accuracy is the ``search@BxM`` column."""
    executor: str = "local"
    sandbox: str = "auto"
    extra: dict = field(default_factory=dict)


_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?(?:[.:]|\s|$)")


def choice_letter(answer: str | None) -> str | None:
    """The option letter in a multiple-choice answer: ``B``, ``(B)``, ``\\text{(B)} 12`` ..."""
    if answer is None:
        return None
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None


def is_correct(traj: Any) -> bool:
    """Verdict of a trajectory, grading multiple choice by letter (the reference is a letter)."""
    ref = (traj.reference or "").strip()
    if re.fullmatch(r"[A-E]", ref):
        return choice_letter(traj.final_answer) == ref
    return traj.verdict == "correct"


def run_benchmark(bench: str, cfg: EvalConfig, backend: Any, pool: Any) -> dict[str, float]:
    """Greedy + sampled runs of one benchmark (resuming from the stores); its table row."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.apps.data import run_collect
    from tirforge.trajectories.datasets import load_dataset
    from tirforge.trajectories.metrics import ProblemSamples, pass_at_k, score_table
    from tirforge.trajectories.store import Store, config_hash

    problems = load_dataset(bench, limit=cfg.limit)
    base = AgentConfig(
        format=cfg.format, max_turns=cfg.max_turns, cell_timeout=cfg.timeout,
        sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0),
    )
    runs = {"greedy": (base, 1)}
    if cfg.n > 1:
        sampled = replace(base, sampling=replace(
            base.sampling, temperature=cfg.temperature, top_p=cfg.top_p))
        runs["sampled"] = (sampled, cfg.n)
    by_run: dict[str, dict[str, list]] = {}
    for name, (agent_cfg, samples) in runs.items():
        cfg_hash = config_hash({"model": cfg.model, "agent": asdict(agent_cfg)})
        store = Store(cfg.out / _slug(cfg.model) / bench / name)

        with store:
            rep = run_collect(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                              backend=backend, pool=pool, agent_cfg=agent_cfg,
                              concurrency=cfg.concurrency, model_name=cfg.model)
        if rep.failed:
            console.print(f"[yellow]{bench}/{name}: {rep.failed} trajectories failed[/yellow]")
        grouped: dict[str, list] = {p.id: [] for p in problems}
        for t in store:
            if t.config_hash == cfg_hash and t.problem_id in grouped and t.sample < samples:
                grouped[t.problem_id].append(t)
        by_run[name] = {pid: sorted(ts, key=lambda t: t.sample) for pid, ts in grouped.items()}
    row: dict[str, float] = {"problems": float(len(problems))}
    if cfg.search_beam > 0:
        m = max(2, cfg.n)
        row[f"search@{cfg.search_beam}x{m}"] = _run_search(bench, problems, cfg, backend, pool)
    greedy = [ts[0] for ts in by_run["greedy"].values() if ts]
    row["greedy"] = 100.0 * sum(map(is_correct, greedy)) / max(1, len(greedy))
    if "sampled" in by_run:
        groups = [ts for ts in by_run["sampled"].values() if len(ts) == cfg.n]
        if cfg.rm is not None:
            _add_rm_scores(groups, cfg.rm)
        table = score_table(
            [ProblemSamples([t.final_answer for t in ts], [is_correct(t) for t in ts],
                            [t.score for t in ts] if cfg.rm else None) for ts in groups],
            cfg.n,
        )
        row[f"maj@{cfg.n}"] = table[f"maj@{cfg.n}"]
        row[f"pass@{cfg.n}"] = 100.0 * sum(
            pass_at_k(cfg.n, sum(map(is_correct, ts)), cfg.n) for ts in groups
        ) / max(1, len(groups))
        if cfg.rm is not None:
            row[f"rm@{cfg.n}"] = table[f"rm@{cfg.n}"]
            row[f"rm_maj@{cfg.n}"] = table[f"rm_maj@{cfg.n}"]
    return row


def _run_search(bench: str, problems: list, cfg: EvalConfig, backend: Any, pool: Any) -> float:
    """Accuracy of RM-guided step search; one stored trajectory (the pick) per problem."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.search import StepSearchConfig, step_search
    from tirforge.agent.strategies import ExecutionScorer
    from tirforge.trajectories.store import Store, config_hash

    m = max(2, cfg.n)
    agent = AgentConfig(format=cfg.format, max_turns=cfg.max_turns, cell_timeout=cfg.timeout,
                        sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                                temperature=cfg.temperature, top_p=cfg.top_p))
    sc = StepSearchConfig(beam_width=cfg.search_beam, expansions_per_step=m, agent=agent)
    cfg_hash = config_hash({"model": cfg.model, "search": asdict(sc), "rm": cfg.rm})
    store = Store(cfg.out / _slug(cfg.model) / bench / f"search-{cfg.search_beam}x{m}")
    scorer: Any = ExecutionScorer()
    if cfg.rm is not None:
        from tirforge.training.rm import RewardScorer

        scorer = RewardScorer(cfg.rm)
    # Searches run in threads, each with its own kernel; the model and the RM are shared, so
    # their calls take turns (a search's B x M continuations already form one batch).
    lock = threading.Lock()

    class Locked:
        name = getattr(backend, "name", "")

        def generate(self, reqs, params):
            with lock:
                return backend.generate(reqs, params)

    class LockedScorer:
        def score(self, trajs):
            with lock:
                return scorer.score(trajs)

    with store:
        done = {t.problem_id for t in store if t.config_hash == cfg_hash}

        def one(p) -> None:
            with pool.kernel() as kernel:
                res = step_search(p.problem, Locked(), kernel, LockedScorer(), sc,
                                  reference=p.reference, problem_id=p.id, model_name=cfg.model)
            res.best.sample, res.best.config_hash = 0, cfg_hash
            store.add(res.best)

        todo = [p for p in problems if p.id not in done]
        with ThreadPoolExecutor(max(1, cfg.concurrency)) as ex:
            for fut in [ex.submit(one, p) for p in todo]:
                try:
                    fut.result()
                except Exception as e:  # counted as wrong; a re-run retries it
                    console.print(f"[yellow]{bench}/search: {type(e).__name__}: {e}[/yellow]")
        picks = {t.problem_id: t for t in store if t.config_hash == cfg_hash}
    return 100.0 * sum(is_correct(picks[p.id]) for p in problems if p.id in picks) / max(
        1, len(problems))


def _add_rm_scores(groups: list[list], rm: str) -> None:
    from tirforge.training.rm import RewardScorer

    todo = [t for ts in groups for t in ts if t.score is None]
    if todo:
        with console.status(f"Scoring {len(todo)} trajectories with {rm} ..."):
            for t, s in zip(todo, RewardScorer(rm).score(todo), strict=True):
                t.score = s


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/"))[-80:] or "model"


def render(rows: dict[str, dict[str, float]], cfg: EvalConfig) -> tuple[Table, str, dict]:
    """The result as a rich table, Markdown and JSON, with an average row."""
    search = f"search@{cfg.search_beam}x{max(2, cfg.n)}"
    cols = ["greedy"] + [c for c in (f"maj@{cfg.n}", f"rm@{cfg.n}", f"rm_maj@{cfg.n}",
                                     f"pass@{cfg.n}", search) if any(c in r for r in rows.values())]
    avg = {c: sum(r[c] for r in rows.values()) / len(rows) for c in cols if rows}
    title = f"{cfg.model} · {cfg.format} · n={cfg.n}"
    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    md = [f"**{title}**", "", "| benchmark | problems | " + " | ".join(cols) + " |",
          "|---|---:|" + "---:|" * len(cols)]
    for name, r in [*rows.items(), ("average", {**avg, "problems": float("nan")})]:
        n = "" if name == "average" else f"{int(r['problems'])}"
        cells = [f"{r[c]:.1f}" for c in cols]
        table.add_row(name, n, *cells, style="bold" if name == "average" else None)
        md.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    data = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "rows": rows, "average": avg}
    return table, "\n".join(md) + "\n", data


def eval_command(
    benchmarks: Annotated[str, typer.Option(help="Comma-separated: gsm8k,math500,...")] = (
        "gsm8k,math500"
    ),
    model: Annotated[str, typer.Option(help="Alias (smollm2), local folder or hub id.")] = (
        "smollm2"
    ),
    format: Annotated[str, typer.Option("--format", help="qwen-tir, qwen-cot or dotamath.")] = (
        "qwen-tir"
    ),
    backend: Annotated[str, typer.Option(help="transformers, openai (any OpenAI-compatible "
                                         "server, e.g. vllm serve) or vllm.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Variable holding the server's key.")] = (
        "OPENAI_API_KEY"
    ),
    n: Annotated[int, typer.Option(help="Samples per problem for maj@N / RM@N.")] = 1,
    rm: Annotated[str | None, typer.Option(help="Reward model folder for RM@N.")] = None,
    search_beam: Annotated[int, typer.Option(
        help="Also run RM-guided step search with this beam width (M = --n continuations "
             "per step); 0: off.")] = 0,
    limit: Annotated[int | None, typer.Option(help="First N problems of each set.")] = None,
    temperature: Annotated[float, typer.Option(help="Temperature of the N samples.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="top-p of the N samples.")] = 0.8,
    max_turns: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per turn at most.")] = 1024,
    concurrency: Annotated[int, typer.Option(help="Trajectories in flight.")] = 4,
    out: Annotated[Path, typer.Option(help="Stores and result files.")] = Path("runs/eval"),
    executor: Annotated[str, typer.Option(help="local or docker.")] = "local",
    sandbox: Annotated[str, typer.Option(help="auto, bwrap or none.")] = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds a code cell may run.")] = 10.0,
    replay: Annotated[Path | None, typer.Option(
        help="Testing: replay these assistant turns (JSON list) instead of a model.")] = None,
    allow_network: Annotated[bool, typer.Option(
        help="Allow hub downloads (the model, and a benchmark with no local copy).")] = False,
) -> None:
    """Evaluate a model: greedy, maj@N and RM@N per benchmark, as in the Qwen2.5-Math report."""
    from tirforge.apps.data import _make_backend
    from tirforge.executors import ExecutorConfig, KernelPool
    from tirforge.trajectories.datasets import DATASETS, DatasetNotFoundError, resolve

    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    unknown = [b for b in names if b not in DATASETS]
    if not names or unknown:
        raise typer.BadParameter(f"unknown benchmark(s) {unknown}; known: {', '.join(DATASETS)}",
                                 param_hint="--benchmarks")
    try:  # find (or download into the cache) every benchmark before loading a model
        for b in names:
            resolve(b, allow_network=allow_network)
    except DatasetNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    cfg = EvalConfig(
        benchmarks=names, model="replay" if replay else model, format=format, n=n,
        temperature=temperature, top_p=top_p, limit=limit, max_turns=max_turns,
        max_new_tokens=max_new_tokens, timeout=timeout, concurrency=concurrency, out=out, rm=rm,
        search_beam=search_beam, executor=executor, sandbox=sandbox,
    )
    try:
        backend_obj = _make_backend(model, replay, allow_network, max_batch=concurrency,
                                        backend=backend, base_url=base_url,
                                        api_key_env=api_key_env)
    except (ValueError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    rows: dict[str, dict[str, float]] = {}
    exec_cfg = ExecutorConfig(backend=executor, sandbox=sandbox, timeout=timeout,
                              pool_size=max(1, concurrency))
    with KernelPool(exec_cfg) as pool:
        pool.install_signal_handlers()
        for bench in names:
            with console.status(f"{bench}: solving ..."):
                rows[bench] = run_benchmark(bench, cfg, backend_obj, pool)
            console.log(f"{bench}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[bench].items()))
    table, md, data = render(rows, cfg)
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(data, indent=2))
    console.print(f"written: {out / 'results.md'}, {out / 'results.json'}")
