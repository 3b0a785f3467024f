"""Stage 5: back-translation. The model restates the instruction from its kept verifier, and
a judge drops the instruction when the restatement contradicts it (AutoIF sec. 2.2, which
uses an NLI model; offline the policy model judges by default, and each record names its
judge)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.common import (
    Paths,
    data_file,
    generate_batches,
    params,
    user_request,
)
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.parse import yes_no

Judge = Callable[[list[tuple[str, str, str]]], list[tuple[bool | None, str]]]
"""(instruction id, original, restated) triples -> per triple (contradiction? None when
unclear, the judge's raw verdict)."""


def policy_judge(backend: Any, cfg: AutoIFConfig) -> Judge:
    """The generating model asked "do A and B contradict?" (greedy); "yes" = contradiction."""
    template = data_file("judge.txt")

    def judge(pairs: list[tuple[str, str, str]]) -> list[tuple[bool | None, str]]:
        reqs = [user_request(template.format(original=a, restated=b), f"judge:{i}", cfg.seed)
                for i, a, b in pairs]
        texts = [c.text for _, comps in generate_batches(
            backend, reqs, params(cfg, temperature=0.0, max_new_tokens=8), cfg.max_batch)
            for c in comps]
        return [(yes_no(t), t.strip()[:80]) for t in texts]

    return judge


def nli_judge(model: str) -> Judge:
    """An NLI cross-encoder (e.g. a local copy of ``cross-encoder/nli-deberta-v3-small``):
    the top label naming contradiction drops the pair. Needs the model on disk (offline)."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=model)

    def judge(pairs: list[tuple[str, str, str]]) -> list[tuple[bool | None, str]]:
        out = clf([{"text": a, "text_pair": b} for _, a, b in pairs])
        return [("contradict" in o["label"].lower(), o["label"]) for o in out]

    return judge


def stage_backtranslate(paths: Paths, backend: Any, cfg: AutoIFConfig,
                        judge: Judge | None = None) -> dict[str, int]:
    """Restate every cross-validated instruction from its first kept function, judge, append."""
    judge_name = cfg.judge
    judge = judge or (policy_judge(backend, cfg) if cfg.judge == "policy" else nli_judge(cfg.judge))
    done = jsonl.done_ids(paths.backtranslate)
    todo = [r for r in jsonl.read(paths.crossval) if r["kept"] and r["id"] not in done]
    template = data_file("backtranslate.txt")
    with jsonl.Appender(paths.backtranslate) as out:
        for i in range(0, len(todo), cfg.max_batch):
            group = todo[i : i + cfg.max_batch]
            reqs = [user_request(template.format(function=r["functions"][0]), f"backtr:{r['id']}",
                                 zlib.crc32(r["id"].encode())) for r in group]
            restated = [c.text.strip() for _, comps in generate_batches(
                backend, reqs, params(cfg, temperature=0.0, max_new_tokens=64), cfg.max_batch)
                for c in comps]
            verdicts = judge([(r["id"], r["instruction"], s)
                              for r, s in zip(group, restated, strict=True)])
            for r, s, (contra, raw) in zip(group, restated, verdicts, strict=True):
                out.add({"id": r["id"], "instruction": r["instruction"], "restated": s,
                         "judge": judge_name, "judge_raw": raw, "contradiction": contra,
                         "kept": contra is not True})
    recs = jsonl.read(paths.backtranslate)
    return {"judged": len(recs), "kept": sum(r["kept"] for r in recs),
            "contradictions": sum(r["contradiction"] is True for r in recs),
            "unclear": sum(r["contradiction"] is None for r in recs)}


def kept_instructions(paths: Paths, cfg: AutoIFConfig) -> list[dict[str, Any]]:
    """Cross-validated instructions that back-translation kept (all cross-validated ones when
    the stage is off), with their kept functions."""
    kept = [r for r in jsonl.read(paths.crossval) if r["kept"]]
    if not cfg.backtranslate:
        return kept
    ok = {r["id"] for r in jsonl.read(paths.backtranslate) if r["kept"]}
    return [r for r in kept if r["id"] in ok]
