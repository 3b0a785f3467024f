"""The Qwen2.5-Math evaluation protocol on the shared benchmarks.

For each benchmark: one greedy run (temperature 0, one sample) and, with ``n > 1``, N sampled
trajectories per problem (temperature 0.7, top-p 0.8 by default); both go to resumable stores
(the collection store), so an interrupted evaluation picks up where it stopped. A row per
benchmark: greedy, maj@N, RM@N and RM-weighted majority (with ``rm``), pass@N and, with
``search_beam``, the accuracy of RM-guided step search. ``tirforge eval`` renders the rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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
    per kept trajectory per step, scored by ``value``, else ``rm``, else execution
    heuristics); its accuracy is the ``search@BxM`` column."""
    value: str | None = None
    """Step-level value model folder (``tirforge train value``) scoring step search's partial
    trajectories instead of the outcome RM."""
    executor: str = "local"
    sandbox: str = "auto"
    extra: dict = field(default_factory=dict)

    def executor_config(self) -> Any:
        """The kernels' settings: one pool of ``concurrency`` kernels."""
        from tirforge.executors import ExecutorConfig

        return ExecutorConfig(backend=self.executor, sandbox=self.sandbox,  # type: ignore[arg-type]
                              timeout=self.timeout, pool_size=max(1, self.concurrency))


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


def run_benchmark(bench: str, cfg: EvalConfig, backend: Any, pool: Any,
                  log: Log = _quiet, *, collector: Any = None) -> dict[str, float]:
    """Greedy + sampled runs of one benchmark (resuming from the stores); its table row:
    ``problems`` and accuracies in percent (greedy, maj@N, pass@N, rm@N, rm_maj@N, search@BxM).
    ``log`` gets a line per batch of failed trajectories (a re-run retries them).

    ``collector``: solve on a Ray cluster instead (``distributed.RayCollector``; ``backend`` and
    ``pool`` may then be None). Step search runs here only: ValueError with ``search_beam``."""
    if collector is not None and cfg.search_beam > 0:
        raise ValueError("step search (search_beam) runs on one machine only, not on Ray")
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.pipelines.collect import run_collect
    from tirforge.trajectories.datasets import load_dataset
    from tirforge.trajectories.metrics import ProblemSamples, pass_at_k, score_table
    from tirforge.trajectories.store import Store, config_hash

    problems = load_dataset(bench, limit=cfg.limit)
    base = AgentConfig(
        format=cfg.format, max_turns=cfg.max_turns,
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
        store = Store(cfg.out / slug(cfg.model) / bench / name)

        with store:
            if collector is None:
                rep = run_collect(problems, samples=samples, store=store, cfg_hash=cfg_hash,
                                  backend=backend, pool=pool, agent_cfg=agent_cfg,
                                  concurrency=cfg.concurrency, model_name=cfg.model)
            else:
                rep = collector.collect(problems, samples=samples, store=store,
                                        cfg_hash=cfg_hash, agent_cfg=agent_cfg,
                                        model_name=cfg.model)
        if rep.failed:
            log(f"{bench}/{name}: {rep.failed} trajectories failed")
        if rep.retried:
            log(f"{bench}/{name}: {len(rep.retried)} jobs re-run after their actor died")
        grouped: dict[str, list] = {p.id: [] for p in problems}
        for t in store:
            if t.config_hash == cfg_hash and t.problem_id in grouped and t.sample < samples:
                grouped[t.problem_id].append(t)
        by_run[name] = {pid: sorted(ts, key=lambda t: t.sample) for pid, ts in grouped.items()}
    row: dict[str, float] = {"problems": float(len(problems))}
    if cfg.search_beam > 0:
        m = max(2, cfg.n)
        row[f"search@{cfg.search_beam}x{m}"] = run_search(bench, problems, cfg, backend, pool, log)
    greedy = [ts[0] for ts in by_run["greedy"].values() if ts]
    row["greedy"] = 100.0 * sum(map(is_correct, greedy)) / max(1, len(greedy))
    if "sampled" in by_run:
        groups = [ts for ts in by_run["sampled"].values() if len(ts) == cfg.n]
        if cfg.rm is not None:
            add_rm_scores(groups, cfg.rm, log)
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


def run_search(bench: str, problems: list, cfg: EvalConfig, backend: Any, pool: Any,
               log: Log = _quiet) -> float:
    """Accuracy of RM-guided step search; one stored trajectory (the pick) per problem."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.search import StepSearchConfig, step_search
    from tirforge.agent.strategies import ExecutionScorer
    from tirforge.trajectories.store import Store, config_hash

    m = max(2, cfg.n)
    agent = AgentConfig(format=cfg.format, max_turns=cfg.max_turns,
                        sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                                temperature=cfg.temperature, top_p=cfg.top_p))
    sc = StepSearchConfig(beam_width=cfg.search_beam, expansions_per_step=m, agent=agent)
    cfg_hash = config_hash({"model": cfg.model, "search": asdict(sc), "rm": cfg.rm,
                            **({"value": cfg.value} if cfg.value else {})})
    store = Store(cfg.out / slug(cfg.model) / bench / f"search-{cfg.search_beam}x{m}")
    scorer: Any = ExecutionScorer()
    if cfg.value is not None:
        from tirforge.training.value import ValueScorer

        scorer = ValueScorer(cfg.value)
    elif cfg.rm is not None:
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

    with store.acquire():  # read what is done only as the one writer
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
                    log(f"{bench}/search: {type(e).__name__}: {e}")
        picks = {t.problem_id: t for t in store if t.config_hash == cfg_hash}
    return 100.0 * sum(is_correct(picks[p.id]) for p in problems if p.id in picks) / max(
        1, len(problems))


def add_rm_scores(groups: list[list], rm: str, log: Log = _quiet) -> None:
    """Score every trajectory of ``groups`` that has no ``score`` yet with the RM in ``rm``."""
    from tirforge.training.rm import RewardScorer

    todo = [t for ts in groups for t in ts if t.score is None]
    if todo:
        log(f"scoring {len(todo)} trajectories with {rm}")
        for t, s in zip(todo, RewardScorer(rm).score(todo), strict=True):
            t.score = s


def slug(model: str) -> str:
    """A model name as one safe folder name (at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/"))[-80:] or "model"
