"""Named benchmarks on the Hugging Face Hub: which public dataset holds each, and its fields.

``trajectories.datasets`` reads a benchmark from a local file first (``$TIRFORGE_DATA``,
``../shared/data``, the local cache); this module is the last resort, used only when the user
allows network. Each ``HubSource`` names the dataset id, config(s), split(s) and a ``FieldMap`` for
*that* dataset's columns, which may differ from the local file's. The Hub copies can differ from
the Qwen2.5-Math evaluation files in row order and count (e.g. SVAMP is train + test, 700 + 300),
so problem ids ``<name>/<row>`` of a Hub copy are not those of a local copy.

Each (id, config, split, fields) is one that public evaluation code loads: lighteval and
Aleph-Alpha's eval-framework (``HuggingFaceH4/MATH-500`` test; ``EleutherAI/hendrycks_math``,
one config per subject, test), NeMo-RL and rLLM (``HuggingFaceH4/aime_2024`` train: id,
problem, answer), harnesses reading ``zwhe99/amc23`` test (question, answer),
``deepmind/aqua_rat`` raw test (254 rows: question, options, correct), ``ChilleD/SVAMP``
train + test (Body, Question, Answer, ID) and ``openai/gsm8k`` main / socratic. They were not
downloaded here (no network); the loader path itself is tested on local Hub-style
repositories. Registered sets without a faithful Hub copy (the other Qwen2.5-Math evaluation
sets) raise with ``NOT_ON_HUB``.

Downloaded rows are written once as JSONL under ``cache_root()/datasets/hub`` so later runs,
offline included, read them without the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from platformdirs import user_cache_dir

if TYPE_CHECKING:
    from tirforge.trajectories.datasets import FieldMap

__all__ = ["DATA_ENV", "HUB_SOURCES", "NOT_ON_HUB", "DataRootMissing", "HubSource", "cache_root",
           "env_data_root", "hub_offline"]


@dataclass(frozen=True)
class HubSource:
    """Where a named benchmark lives on the Hub."""

    repo: str
    """Dataset id, e.g. ``openai/gsm8k`` (``datasets.load_dataset``'s ``path``)."""
    configs: tuple[str | None, ...]
    """Configs (subsets) read in order and concatenated; ``(None,)``: the default one."""
    splits: tuple[str, ...]
    """Splits read in order and concatenated, for each config."""
    fields: FieldMap
    """The Hub dataset's own field names."""

    def describe(self) -> str:
        cfg = ",".join(c for c in self.configs if c) or "default"
        return f"{self.repo} (config {cfg}, split {'+'.join(self.splits)})"

    def cache_file(self) -> Path:
        """JSONL copy of the downloaded rows under the local cache."""
        cfg = "+".join(c or "default" for c in self.configs)
        return (cache_root() / "datasets" / "hub" / self.repo.replace("/", "__")
                / f"{cfg}-{'+'.join(self.splits)}.jsonl")


def cache_root() -> Path:
    """The project's cache root: ``$TIRFORGE_CACHE`` or the platform user cache dir (the same
    root ``agent.models.cache_dir`` puts converted models under, in ``models/``)."""
    return Path(os.environ.get("TIRFORGE_CACHE") or user_cache_dir("tirforge"))


DATA_ENV = "TIRFORGE_DATA"
"""The variable naming a folder laid out like ``../shared/data`` (first place looked in)."""


class DataRootMissing(FileNotFoundError):
    """``$TIRFORGE_DATA`` is set but names no folder (a typo would otherwise silently fall
    back to ``../shared/data`` or the cache, or end in a download)."""


def env_data_root() -> Path | None:
    """``$TIRFORGE_DATA`` as a folder; None when unset or empty. Raises ``DataRootMissing``
    naming the variable when it is set to something that is not an existing folder."""
    value = os.environ.get(DATA_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise DataRootMissing(f"{DATA_ENV}={value}: {what}; point it at a folder laid out like "
                              f"../shared/data (gsm8k/test.jsonl, ...) or unset it")
    return root


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set to a true value: the same rule
    ``agent.models.resolve_model`` applies to hub models."""
    return any(
        os.environ.get(v, "0") not in ("0", "", "false", "False")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _sources() -> dict[str, HubSource]:
    from tirforge.trajectories.datasets import FieldMap

    gsm8k = FieldMap("question", "answer", "gsm8k")
    math_subjects = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                     "number_theory", "prealgebra", "precalculus")
    return {
        "gsm8k": HubSource("openai/gsm8k", ("main",), ("test",), gsm8k),
        "gsm8k-train": HubSource("openai/gsm8k", ("main",), ("train",), gsm8k),
        "gsm8k-socratic": HubSource("openai/gsm8k", ("socratic",), ("test",), gsm8k),
        "qwen-gsm8k": HubSource("openai/gsm8k", ("main",), ("test",), gsm8k),
        # MATH test (5000): one config per subject; answer = the solution's \boxed{}.
        "math": HubSource("EleutherAI/hendrycks_math", math_subjects, ("test",),
                          FieldMap("problem", "solution", "boxed", keep=("level", "type"))),
        "math500": HubSource("HuggingFaceH4/MATH-500", (None,), ("test",),
                             FieldMap("problem", "answer", id="unique_id",
                                      keep=("level", "subject"))),
        "aime24": HubSource("HuggingFaceH4/aime_2024", (None,), ("train",),
                            FieldMap("problem", "answer", id="id")),
        "amc23": HubSource("zwhe99/amc23", (None,), ("test",), FieldMap("question", "answer")),
        "aqua": HubSource("deepmind/aqua_rat", ("raw",), ("test",),
                          FieldMap("question", "correct", options="options")),
        "svamp": HubSource("ChilleD/SVAMP", (None,), ("train", "test"),
                           FieldMap(("Body", "Question"), "Answer", id="ID")),
    }


HUB_SOURCES: dict[str, HubSource] = {}
"""Filled on first use (``FieldMap`` lives in ``datasets``, which imports this module)."""

NOT_ON_HUB = (
    "no faithful copy on the Hugging Face Hub; get it from "
    "https://github.com/QwenLM/Qwen2.5-Math (evaluation/data/{name})"
)
"""Message for registered sets without a Hub source (the Qwen2.5-Math evaluation-only sets)."""


def hub_source(name: str) -> HubSource | None:
    """The Hub source of a registered benchmark, or None when it is not published there."""
    if not HUB_SOURCES:
        HUB_SOURCES.update(_sources())
    return HUB_SOURCES.get(name)


def download(src: HubSource) -> Path:
    """Fetch every (config, split) of ``src`` with ``datasets`` and write the rows, in order, to
    ``src.cache_file()`` (atomically: a temp file then rename). Returns that file.

    Raises whatever ``datasets.load_dataset`` raises (no network, unknown id, ...)."""
    import datasets

    dest = src.cache_file()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    hf_cache = str(cache_root() / "datasets" / "hf")
    with tmp.open("w", encoding="utf-8") as f:
        for row in _rows(datasets, src, hf_cache):
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(dest)
    return dest


def _rows(datasets, src: HubSource, cache_dir: str) -> Iterator[dict]:
    for cfg in src.configs:
        for split in src.splits:
            yield from datasets.load_dataset(src.repo, cfg, split=split, cache_dir=cache_dir)
