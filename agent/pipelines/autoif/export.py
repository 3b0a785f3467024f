"""Stage 8: the scored responses as training sets in the project's formats.

Files written to ``8_export/`` (atomically):
- ``sft.jsonl``: ``messages`` rows of responses with pass rate >= ``sft_threshold``
  (``tirforge train sft --train-file``);
- ``dpo_pairs.jsonl``: TRL conversational preference rows (prompt / chosen / rejected): chosen
  pass rate >= ``dpo_chosen_min``, rejected pass rate == 0, same query and instruction;
- ``dpo.jsonl``: the trajectories of those pairs, chosen graded ``correct`` and rejected
  ``incorrect`` (``tirforge train dpo --train-file``, which pairs them per prompt the same way).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from tirforge.agent.pipelines.autoif import jsonl
from tirforge.agent.pipelines.autoif.common import Paths
from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.responses import responses_hash
from tirforge.trajectories.messages import to_messages
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.store import Store


def dpo_pairs(trajs: list[Trajectory], cfg: AutoIFConfig,
              max_per_prompt: int = 4) -> list[tuple[Trajectory, Trajectory]]:
    """(chosen, rejected) of the same pair id: chosen score >= ``dpo_chosen_min``, rejected
    score == 0; at most ``max_per_prompt`` per prompt, drawn with ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        groups[t.problem_id or ""].append(t)
    out = []
    for pid in sorted(groups):
        g = sorted(groups[pid], key=lambda t: t.sample or 0)
        combos = [(c, r) for c in g if (c.score or 0) >= cfg.dpo_chosen_min
                  for r in g if r.score == 0]
        rng.shuffle(combos)
        out += combos[:max_per_prompt]
    return out


def stage_export(paths: Paths, cfg: AutoIFConfig, model: str = "") -> dict[str, Any]:
    h = responses_hash(cfg, model)
    pair_ids = {p["id"] for p in jsonl.read(paths.pairs)}
    trajs = [t for t in Store(paths.responses) if t.config_hash == h and t.problem_id in pair_ids]
    sft = [t for t in trajs if (t.score or 0) >= cfg.sft_threshold]
    jsonl.write_atomic(paths.export / "sft.jsonl", [
        {"messages": to_messages(t), "pair_id": t.problem_id, "score": t.score} for t in sft])
    pairs = dpo_pairs(trajs, cfg)
    jsonl.write_atomic(paths.export / "dpo_pairs.jsonl", [
        {"pair_id": c.problem_id, "prompt": c.messages,
         "chosen": to_messages(c)[len(c.messages):], "rejected": to_messages(r)[len(r.messages):],
         "chosen_score": c.score, "rejected_score": r.score} for c, r in pairs])
    members: dict[str, Trajectory] = {}
    for c, r in pairs:
        members[c.id] = c.model_copy(update={"verdict": "correct"})
        members[r.id] = r.model_copy(update={"verdict": "incorrect"})
    jsonl.write_atomic(paths.export / "dpo.jsonl",
                       [t.model_dump(mode="json") for t in members.values()])
    return {"sft": len(sft), "dpo_pairs": len(pairs),
            "dpo_prompts": len({c.problem_id for c, _ in pairs})}
