"""Stages 1-3: seed instructions, self-instruct augmentation, verifier drafts."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.common import (
    Paths,
    data_file,
    data_path,
    generate_batches,
    params,
    user_request,
)
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.parse import (
    BadJSON,
    instruction_lines,
    normalize,
    parse_verifier,
    text_id,
)


def load_seeds(path: Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Seed instructions: JSONL rows with an ``instruction`` string (the shipped set when
    ``path`` is None; a plain text file gives one instruction a line). Raises ValueError for a
    row without one, naming the line."""
    path = path or data_path("seeds.jsonl")
    rows: list[dict[str, Any]] = []
    text = path.read_text()
    if path.suffix != ".jsonl":
        rows = [{"instruction": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        import json

        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
                raise ValueError(f"{path}:{n}: expected an object with an 'instruction' string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no seed instructions")
    out = [{"id": text_id(r["instruction"]), "instruction": r["instruction"].strip(),
            "source": "seed", "category": r.get("category", "")} for r in rows]
    return out[:limit] if limit else out


def stage_seeds(paths: Paths, seeds: list[dict[str, Any]]) -> dict[str, int]:
    """Stage 1: write the seeds (kept when already written, so a resume uses the same set)."""
    if not paths.seeds.exists():
        jsonl.write_atomic(paths.seeds, seeds)
    return {"seeds": len(jsonl.read(paths.seeds))}


def stage_augment(paths: Paths, backend: Any, cfg: AutoIFConfig) -> dict[str, int]:
    """Stage 2: ``augment_rounds`` generations each propose instructions from a few seeds;
    seeds + proposals, deduplicated on normalised text, go to the instruction file."""
    seeds = jsonl.read(paths.seeds)
    done = jsonl.done_ids(paths.augment)
    reqs = []
    for r in range(cfg.augment_rounds):
        rid = f"round-{r}"
        if rid in done:
            continue
        rng = random.Random(cfg.seed * 1_000_003 + r)
        shots = rng.sample(seeds, min(cfg.augment_shots, len(seeds)))
        prompt = data_file("augment.txt").format(
            examples="\n".join(s["instruction"] for s in shots))
        reqs.append(user_request(prompt, f"augment:{rid}", zlib.crc32(rid.encode()) + cfg.seed))
    with jsonl.Appender(paths.augment) as out:
        for batch, comps in generate_batches(backend, reqs, params(cfg), cfg.max_batch):
            for req, c in zip(batch, comps, strict=True):
                out.add({"id": req.tag.split(":", 1)[1], "raw": c.text,
                         "proposed": instruction_lines(c.text)})
    seen: set[str] = set()
    rows = []
    for s in seeds:
        key = normalize(s["instruction"])
        if key not in seen:
            seen.add(key)
            rows.append(s)
    proposed = 0
    for rec in jsonl.read(paths.augment):
        for text in rec["proposed"]:
            proposed += 1
            key = normalize(text)
            if key and key not in seen:
                seen.add(key)
                rows.append({"id": text_id(text), "instruction": text, "source": "augment",
                             "category": ""})
    rows = rows[: cfg.max_instructions]
    jsonl.write_atomic(paths.instructions, rows)
    return {"proposed": proposed, "augmented_unique": sum(r["source"] == "augment" for r in rows),
            "instructions": len(rows)}


def stage_verifiers(paths: Paths, backend: Any, cfg: AutoIFConfig) -> dict[str, int]:
    """Stage 3: K generations per instruction, each parsed as a function + cases; a
    generation that is not such JSON is counted (``bad_json``), never fatal."""
    instrs = jsonl.read(paths.instructions)
    done = jsonl.done_ids(paths.verifiers)
    todo = [i for i in instrs if i["id"] not in done]
    k = cfg.verifiers_per_instruction
    template = data_file("verifier.txt")
    with jsonl.Appender(paths.verifiers) as out:
        # One instruction's K generations share a batch group, so each record is whole.
        per = max(1, cfg.max_batch // k)
        for j in range(0, len(todo), per):
            group = todo[j : j + per]
            reqs = [user_request(template.format(instruction=i["instruction"]),
                                 f"verify:{i['id']}#{s}", zlib.crc32(f"{i['id']}#{s}".encode()))
                    for i in group for s in range(k)]
            texts = [c.text for _, comps in
                     generate_batches(backend, reqs, params(cfg), cfg.max_batch) for c in comps]
            for n, instr in enumerate(group):
                drafts, bad, samples = [], 0, []
                for text in texts[n * k : (n + 1) * k]:
                    try:
                        d = parse_verifier(text)
                    except BadJSON:
                        bad += 1
                        samples.append(text[:300])  # what the model wrote instead, for reports
                        continue
                    drafts.append({"function": d.function, "cases": d.cases})
                out.add({"id": instr["id"], "instruction": instr["instruction"],
                         "generations": k, "bad_json": bad, "drafts": drafts,
                         "bad_samples": samples})
    recs = jsonl.read(paths.verifiers)
    return {"instructions": len(recs),
            "generations": sum(r["generations"] for r in recs),
            "bad_json": sum(r["bad_json"] for r in recs),
            "with_drafts": sum(bool(r["drafts"]) for r in recs)}
