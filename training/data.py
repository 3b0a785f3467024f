"""Training data from trajectory files: loading, selection, pairs and groups per problem."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tirforge.trajectories.messages import SegmentedMessage, segments_from_messages, to_segments
from tirforge.trajectories.schema import Trajectory, read_jsonl

log = logging.getLogger("tirforge.training")

Record = Trajectory | list[dict]
"""A trajectory, or plain chat messages from a dataset's ``messages`` column."""


def load_records(path: str | Path) -> list[Record]:
    """Trajectories from a JSONL file or a ``collect`` store folder (its ``shard-*.jsonl``,
    each trajectory once), or ``messages`` rows from a JSONL file / saved HF dataset folder.

    Raises FileNotFoundError for a missing path, ValueError for an empty file or folder, or
    rows of neither kind."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no training data at {path}")
    if path.is_dir() and not (path / "dataset_info.json").exists():
        from tirforge.trajectories.store import Store

        store = Store(path)
        if not store.shards():
            raise ValueError(f"{path}: neither a collect store (shard-*.jsonl) nor a saved "
                             "dataset folder (dataset_info.json)")
        return list(store.read())
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if "messages" not in ds.column_names:
            raise ValueError(f"{path}: a dataset needs a `messages` column, has {ds.column_names}")
        return [list(m) for m in ds["messages"]]
    first = next((ln for ln in path.open(encoding="utf-8") if ln.strip()), None)
    if first is None:
        raise ValueError(f"{path} is empty")
    if "steps" in json.loads(first):
        return list(read_jsonl(path))
    rows = [json.loads(ln) for ln in path.open(encoding="utf-8") if ln.strip()]
    if not all(isinstance(r.get("messages"), list) for r in rows):
        raise ValueError(f"{path}: each line must be a Trajectory or have a `messages` list")
    return [r["messages"] for r in rows]


def segments(record: Record, style: str) -> list[SegmentedMessage]:
    if isinstance(record, Trajectory):
        return to_segments(record, style)  # type: ignore[arg-type]
    return segments_from_messages(record)


def only_correct(records: list[Record]) -> list[Record]:
    """RFT: keep trajectories graded correct (plain ``messages`` rows are kept as they are)."""
    return [r for r in records if not isinstance(r, Trajectory) or r.verdict == "correct"]


def by_problem(trajs: list[Trajectory]) -> dict[str, list[Trajectory]]:
    """Group graded trajectories by problem (``problem_id``, else the problem text)."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        if t.verdict is not None:
            groups[t.problem_id or t.problem].append(t)
    return dict(groups)


def preference_pairs(
    trajs: list[Trajectory], max_pairs_per_problem: int = 4, seed: int = 0
) -> list[tuple[Trajectory, Trajectory]]:
    """(correct, incorrect) pairs of the same problem; problems lacking either side are skipped."""
    rng = random.Random(seed)
    pairs = []
    for group in by_problem(trajs).values():
        good = [t for t in group if t.verdict == "correct"]
        bad = [t for t in group if t.verdict != "correct"]
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        pairs += combos[:max_pairs_per_problem]
    return pairs


def require_trajectories(records: list[Record], what: str) -> list[Trajectory]:
    trajs = [r for r in records if isinstance(r, Trajectory)]
    if len(trajs) != len(records):
        raise ValueError(f"{what} needs graded Trajectory records (verdict), not plain messages "
                         "(an `export`/`select` dataset): pass the collect store folder or a "
                         "JSONL of its trajectories")
    return trajs


def problem_name(t: Trajectory) -> str:
    """A trajectory's problem in reports: its id, else the start of its text (quoted)."""
    return repr(t.problem_id or t.problem[:40])


def pair_name(chosen: Trajectory, rejected: Trajectory) -> str:
    """How a (correct, incorrect) pair is named in reports: problem and both trajectory ids."""
    return f"{problem_name(chosen)}: {chosen.id} vs {rejected.id}"


@dataclass
class FitReport:
    """What fitting a trainer's examples into ``max_length`` did; logged once before training.

    ``truncated`` counts sequences cut by ``training.truncation.keep_end``; ``identical`` names
    examples dropped because their sides became the same tokens with opposite labels (no
    preference left to learn); ``skipped`` names bad examples with the reason (never fatal)."""

    what: str
    """The examples, e.g. "DPO pairs"."""
    max_length: int | None
    kept: int = 0
    sequences: int = 0
    truncated: int = 0
    identical: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def line(self, show: int = 20) -> str:
        """One line: counts, then the dropped and skipped examples by name (first ``show``)."""

        def names(items: list[str]) -> str:
            more = f"; +{len(items) - show} more" if len(items) > show else ""
            return "; ".join(items[:show]) + more

        out = (f"{self.what}: {self.kept} kept; {self.truncated} of {self.sequences} sequences "
               f"longer than max_length={self.max_length} truncated (prompt head + end kept)")
        if self.identical:
            out += (f"; {len(self.identical)} dropped, identical after truncation: "
                    f"[{names(self.identical)}]")
        if self.skipped:
            out += f"; {len(self.skipped)} skipped: [{names(self.skipped)}]"
        return out

    def log(self) -> None:
        """A warning when anything was cut, dropped or skipped; info otherwise."""
        noteworthy = self.truncated or self.identical or self.skipped
        log.log(logging.WARNING if noteworthy else logging.INFO, self.line())
