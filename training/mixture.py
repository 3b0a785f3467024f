"""Data mixtures for SFT, and the DMT two-stage schedule.

A mixture is a list of sources, each a trajectory / messages file with how much of it to take:
``count`` records, or a ``fraction`` of the file (above 1 repeats it: upsampling). The records
are drawn with a seeded shuffle and the mixture is shuffled as a whole.

DMT (Dong et al., 2023, "How Abilities in Large Language Models are Affected by Supervised
Fine-tuning Data Composition"): stage 1 fine-tunes on the specialised data (here: TIR
trajectories) alone; stage 2 on the general data plus a small share ``k`` of the specialised data
(the paper's best was k = 1/256), which keeps the specialised skill while general ability
recovers. ``dmt_stages`` returns the two mixtures; run ``tirforge train sft`` once per stage, the
second from the first one's output model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tirforge.training.data import Record, load_records


@dataclass
class Source:
    path: str
    """Trajectory JSONL, messages JSONL or saved HF dataset."""
    count: int | None = None
    """Take exactly this many records (repeating the file if it is smaller)."""
    fraction: float = 1.0
    """Take this share of the file when ``count`` is None (> 1 upsamples)."""


def _take(records: list[Record], n: int, rng: random.Random) -> list[Record]:
    out: list[Record] = []
    while len(out) < n:  # whole shuffled passes, then a partial one
        batch = records[:]
        rng.shuffle(batch)
        out += batch[: n - len(out)]
    return out


def load_mixture(sources: list[Source | dict], seed: int = 0) -> list[Record]:
    """All sources' records in the requested amounts, shuffled together."""
    rng = random.Random(seed)
    mixed: list[Record] = []
    for src in sources:
        src = Source(**src) if isinstance(src, dict) else src
        if src.count is not None and src.count < 0 or src.fraction < 0:
            raise ValueError(f"{src.path}: count and fraction must be non-negative")
        records = load_records(src.path)
        n = src.count if src.count is not None else round(len(records) * src.fraction)
        mixed += _take(records, n, rng)
    rng.shuffle(mixed)
    return mixed


def dmt_stages(
    specialised: list[str], general: list[str], k: float = 1 / 256
) -> tuple[list[Source], list[Source]]:
    """The two DMT mixtures: (specialised only, general + fraction k of the specialised)."""
    if not 0 <= k <= 1:
        raise ValueError(f"k is a share of the specialised data, in [0, 1]; got {k}")
    stage1 = [Source(p) for p in specialised]
    stage2 = [Source(p) for p in general] + [Source(p, fraction=k) for p in specialised]
    return stage1, stage2
