"""Export trajectories as a Hugging Face ``datasets.Dataset`` (and JSONL / Parquet / save_to_disk).

SFT rows carry ``messages`` (OpenAI chat format, code outputs as ``tool`` messages) and
``messages_fenced`` (one assistant message in the Qwen TIR text layout, outputs in ```output
blocks); DPO rows follow TRL's conversational preference format (prompt / chosen / rejected).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets

from tirforge.trajectories.messages import to_messages
from tirforge.trajectories.schema import Trajectory

__all__ = ["OUT_FORMATS", "out_format", "save", "to_dpo_dataset", "to_sft_dataset"]


def sft_row(t: Trajectory) -> dict:
    return {
        "id": t.id,
        "problem_id": t.problem_id,
        "problem": t.problem,
        "reference": t.reference,
        "final_answer": t.final_answer,
        "verdict": t.verdict,
        "model": t.model,
        "score": t.score,
        "n_turns": len(t.steps),
        "messages": to_messages(t, "tool"),
        "messages_fenced": to_messages(t, "fenced"),
        # Per-trajectory settings differ in shape; JSON keeps the column type fixed.
        "sampling": json.dumps(t.sampling, sort_keys=True),
    }


def to_sft_dataset(trajs: Iterable[Trajectory]) -> datasets.Dataset:
    rows = [sft_row(t) for t in trajs]
    if not rows:
        raise ValueError("nothing to export: no trajectories were selected")
    return datasets.Dataset.from_list(rows)


def _completion(t: Trajectory) -> list[dict]:
    return to_messages(t, "tool")[len(t.messages) :]


def to_dpo_dataset(pairs: Sequence[tuple[Trajectory, Trajectory]]) -> datasets.Dataset:
    if not pairs:
        raise ValueError("nothing to export: no correct/incorrect pairs")
    rows = []
    for chosen, rejected in pairs:
        rows.append(
            {
                "problem_id": chosen.problem_id,
                "prompt": chosen.messages,
                "chosen": _completion(chosen),
                "rejected": _completion(rejected),
                "chosen_id": chosen.id,
                "rejected_id": rejected.id,
            }
        )
    return datasets.Dataset.from_list(rows)


OUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", "": "folder"}
"""Output path suffix -> what ``save`` writes there (no suffix: a ``save_to_disk`` folder)."""


def out_format(out: str | Path) -> str:
    """What ``save`` writes at ``out``: ``jsonl`` (one JSON row a line), ``parquet`` (one file)
    or ``folder`` (``save_to_disk``; a path with no suffix, or an empty folder or a saved
    dataset). Raises ValueError for any other suffix (say ``x.json`` or ``x.csv``), naming the
    ones accepted, and for a folder holding other files (a store), so a command can refuse
    before it reads anything."""
    out = Path(out)
    if out.is_dir():
        # save_to_disk replaces a saved dataset, and would mix its files into any other
        # folder (a store's shards, a run folder): only an empty one or a dataset is taken.
        if any(out.iterdir()) and not (out / "dataset_info.json").exists():
            raise ValueError(f"{out} is a folder holding other files (a store or run folder?); "
                             "write the dataset to a new folder, *.jsonl or *.parquet")
        return "folder"
    kind = OUT_FORMATS.get(out.suffix.lower())
    if kind is None:
        raise ValueError(f"{out}: unsupported suffix {out.suffix!r}; write *.jsonl, *.parquet "
                         "or a folder (a path with no suffix)")
    if out.exists() and kind == "folder":
        raise ValueError(f"{out} is a file; a dataset folder is written at a path with no suffix")
    return kind


def save(ds: datasets.Dataset, out: str | Path) -> Path:
    """``*.jsonl`` -> JSON lines (``train sft --train-file`` reads its ``messages``),
    ``*.parquet`` -> one Parquet file, a path with no suffix -> a ``save_to_disk`` folder.
    Raises ValueError for another suffix (see ``out_format``)."""
    out = Path(out)
    kind = out_format(out)
    if kind == "folder":
        ds.save_to_disk(str(out))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        ds.to_json(str(out), lines=True, force_ascii=False)
    else:
        ds.to_parquet(str(out))
    return out
