"""Stages 6-7: pair instructions with queries; sample responses and score them by execution.

A response's score is its pass rate over the instruction's kept verifier functions, each run
in the sandbox. Responses are graded trajectories in a ``Store`` keyed by (pair id, sample,
config hash), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.backtranslate import kept_instructions
from tirforge.agent.pipelines.autoif.common import (
    Paths,
    data_file,
    data_path,
    generate_batches,
    params,
    user_request,
)
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.parse import text_id
from tirforge.agent.pipelines.autoif.sandbox import run_functions
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.store import Store, config_hash


def load_queries(source: str | Path | None = None, field: str = "query",
                 limit: int | None = None) -> list[str]:
    """User queries: the shipped sample (None), a JSONL file, a saved HF dataset folder, or a
    hub dataset name (its ``train`` split; needs the cache offline). ``field`` names the
    column. Raises ValueError when a row lacks it or no query is found."""
    if source is None:
        source = data_path("queries.jsonl")
    p = Path(source)
    if p.is_file():
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    else:
        import datasets

        ds = datasets.load_from_disk(str(p)) if p.is_dir() else \
            datasets.load_dataset(str(source), split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        rows = list(ds)
    bad = [i for i, r in enumerate(rows) if not isinstance(r.get(field), str)]
    if bad:
        raise ValueError(f"{source}: row {bad[0] + 1} has no string field {field!r}")
    out = [r[field].strip() for r in rows if r[field].strip()]
    if not out:
        raise ValueError(f"{source}: no queries")
    return out[:limit] if limit else out


def prompt_of(query: str, instruction: str) -> str:
    return data_file("respond.txt").format(query=query, instruction=instruction).strip()


def stage_queries(paths: Paths, queries: list[str], cfg: AutoIFConfig) -> dict[str, int]:
    """Stage 6: ``queries_per_instruction`` queries per kept instruction, drawn with a seed per
    instruction (a re-run draws the same pairs)."""
    rows = []
    for instr in kept_instructions(paths, cfg):
        rng = random.Random(zlib.crc32(instr["id"].encode()) + cfg.seed)
        for q in rng.sample(queries, min(cfg.queries_per_instruction, len(queries))):
            rows.append({"id": text_id(instr["id"], q), "instruction_id": instr["id"],
                         "instruction": instr["instruction"], "query": q,
                         "prompt": prompt_of(q, instr["instruction"])})
    jsonl.write_atomic(paths.pairs, rows)
    return {"instructions": len({r["instruction_id"] for r in rows}), "pairs": len(rows)}


def responses_hash(cfg: AutoIFConfig, model: str) -> str:
    """The store's config hash: what changes the responses (model and sampling)."""
    return config_hash({"model": model, "max_new_tokens": cfg.max_new_tokens,
                        "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed})


def verdict_of(score: float, cfg: AutoIFConfig) -> str:
    """correct: pass rate >= ``sft_threshold``; incorrect: 0; partial between."""
    return "correct" if score >= cfg.sft_threshold else "incorrect" if score == 0 else "partial"


def stage_responses(paths: Paths, backend: Any, pool: Any, cfg: AutoIFConfig,
                    model: str = "") -> dict[str, Any]:
    """Stage 7: ``responses_per_query`` samples per pair not yet in the store; each is scored
    in the sandbox and stored as a graded trajectory as soon as its batch is scored."""
    functions = {r["id"]: r["functions"] for r in jsonl.read(paths.crossval) if r["kept"]}
    pairs = {p["id"]: p for p in jsonl.read(paths.pairs)}
    h = responses_hash(cfg, model)
    # The writer lock first, then what is done; `with` gives it back when a batch raises.
    with Store(paths.responses).acquire() as store:
        done = store.done_keys()
        reqs = [user_request(p["prompt"], f"respond:{pid}#{k}", zlib.crc32(f"{pid}#{k}".encode())
                             + cfg.seed)
                for pid, p in pairs.items() for k in range(cfg.responses_per_query)
                if (pid, k, h) not in done]
        sampling = params(cfg)
        for batch, comps in generate_batches(backend, reqs, sampling, cfg.max_batch):
            by_pair: dict[str, list[tuple[int, str]]] = {}
            for req, c in zip(batch, comps, strict=True):
                pid, k = req.tag.split(":", 1)[1].rsplit("#", 1)
                by_pair.setdefault(pid, []).append((int(k), c.text))
            for pid, samples in by_pair.items():
                p = pairs[pid]
                runs = run_functions(pool, functions[p["instruction_id"]],
                                     [t for _, t in samples], timeout=cfg.cell_timeout,
                                     max_output_chars=cfg.max_output_chars)
                for j, (k, text) in enumerate(samples):
                    score = sum(r.results[j] is True for r in runs) / len(runs) if runs else 0.0
                    store.add(Trajectory(
                        problem=p["prompt"], problem_id=pid, sample=k, config_hash=h,
                        messages=[{"role": "user", "content": p["prompt"]}],
                        steps=[Step(text=text)], final_answer=None, score=score,
                        verdict=verdict_of(score, cfg), stop_reason="answer", model=model,
                        format="plain", sampling={**sampling.as_dict(), "seed": zlib.crc32(
                            f"{pid}#{k}".encode()) + cfg.seed},
                    ))
    trajs = [t for t in Store(paths.responses) if t.config_hash == h and t.problem_id in pairs]
    return {"responses": len(trajs), "new": len(reqs),
            "mean_pass_rate": round(sum(t.score or 0 for t in trajs) / len(trajs), 4)
            if trajs else 0.0,
            "pass_all": sum(t.verdict == "correct" for t in trajs),
            "pass_none": sum(t.verdict == "incorrect" for t in trajs)}
