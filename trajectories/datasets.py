"""Problem loaders: every named benchmark (``DATASETS``) plus any JSONL / Parquet / HF folder.

A named benchmark is read from the first place that has it (``resolve``):

1. ``$TIRFORGE_DATA/<path>`` (a folder laid out like ``../shared/data``),
2. ``../shared/data/<path>`` next to the repository,
3. the local cache: ``<cache>/datasets/<path>`` (a copy you put there) or the rows a previous
   run downloaded from the Hub (``<cache>`` = ``$TIRFORGE_CACHE`` or the user cache dir),
4. the Hugging Face Hub (``trajectories.hub``), only with ``allow_network=True``
   (``--allow-network``) and ``HF_HUB_OFFLINE`` unset; the rows are then cached for step 3.

Nothing found: one ``DatasetNotFoundError`` naming the variable, the folders and the flag.

Each source has its own field names; a ``FieldMap`` says which field holds the problem, which the
reference answer and how to read that answer (GSM8K ``#### N``, MATH ``\\boxed{}`` in a solution,
a multiple-choice letter, ...). Malformed rows raise with ``file:line`` instead of being dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tirforge.trajectories import hub
from tirforge.trajectories.grading import extract_boxed, reference_answer
from tirforge.trajectories.references import boxed_reference

__all__ = [
    "DATASETS", "DatasetNotFoundError", "FieldMap", "Problem", "data_root", "load_dataset",
    "load_file", "resolve",
]

AnswerFormat = Literal["raw", "gsm8k", "boxed", "choice_index", "list", "unit_paren"]


@dataclass
class Problem:
    """One problem to solve."""

    id: str
    """Stable id, ``<dataset>/<row index>``: the store's resume key builds on it."""
    problem: str
    """The question text given to the model."""
    reference: str | None
    """Bare reference answer (None: unknown, e.g. a new problem to label by consensus)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Other fields worth keeping (level, subject, provenance, ...)."""


@dataclass
class FieldMap:
    """Where a source keeps its problem and answer."""

    problem: str | tuple[str, ...] = "problem"
    """Problem field; several fields are joined with a space (e.g. SVAMP's Body + Question)."""
    answer: str | tuple[str, ...] | None = "answer"
    """Answer field, or fields tried in order (first non-empty wins); None: no answer."""
    answer_format: AnswerFormat = "raw"
    """``raw``: the field is the answer; ``gsm8k``: ``... #### N``; ``boxed``: last \\boxed{} of a
    solution; ``choice_index``: 0-based index -> letter; ``list``: join a list with ", ";
    ``unit_paren``: drop a trailing "(unit)" as in ASDiv's "9 (apples)"."""
    options: str | None = None
    """Multiple-choice options field (list, dict or string), appended to the problem."""
    id: str | None = None
    """Field with the source's own id, kept in ``meta['source_id']``."""
    keep: tuple[str, ...] = ()
    """Extra fields copied into ``meta``."""
    answer_required: bool = True
    """Raise when a row has no answer (off for unlabelled problem sets)."""


@dataclass
class DatasetSpec:
    path: str
    """Path relative to the data root."""
    fields: FieldMap


def _q(name: str, fields: FieldMap, file: str = "test.jsonl") -> DatasetSpec:
    return DatasetSpec(f"qwen25_math_eval/{name}/{file}", fields)


_QUESTION = FieldMap(problem="question")
DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("gsm8k/test.jsonl", FieldMap("question", "answer", "gsm8k")),
    "gsm8k-train": DatasetSpec("gsm8k/train.jsonl", FieldMap("question", "answer", "gsm8k")),
    "gsm8k-socratic": DatasetSpec(
        "gsm8k/test_socratic.jsonl", FieldMap("question", "answer", "gsm8k")
    ),
    "math": DatasetSpec(
        "math/test.jsonl", FieldMap("problem", "solution", "boxed", keep=("level", "type"))
    ),
    "math500": DatasetSpec(
        "math500/test.jsonl",
        FieldMap("problem", "answer", id="unique_id", keep=("level", "subject")),
    ),
    "aime24": _q("aime24", FieldMap("problem", "answer", id="id")),
    "amc23": _q("amc23", FieldMap("question", "answer", id="id")),
    "aqua": _q("aqua", FieldMap("question", "correct", options="options")),
    "asdiv": _q("asdiv", FieldMap(("body", "question"), "answer", "unit_paren")),
    "carp_en": _q("carp_en", FieldMap("content", "answer")),
    "cmath": _q("cmath", _QUESTION),
    "cn_middle_school": _q("cn_middle_school", _QUESTION),
    "college_math": _q("college_math", FieldMap("question", "answer", keep=("data_topic",))),
    # Two rows (HMMT items) ship with an empty answer: loaded unlabelled, not dropped.
    "gaokao2023en": _q("gaokao2023en", FieldMap("question", answer_required=False)),
    "gaokao2024_I": _q("gaokao2024_I", _QUESTION),
    "gaokao2024_II": _q("gaokao2024_II", _QUESTION),
    # Mostly multiple choice: the letter is the answer; fill-in items only have ``answer``.
    "gaokao2024_mix": _q("gaokao2024_mix", FieldMap("question", ("choice_answer", "answer"))),
    "gaokao_math_cloze": _q("gaokao_math_cloze", _QUESTION),
    "gaokao_math_qa": _q("gaokao_math_qa", FieldMap("question", "label", options="options")),
    "qwen-gsm8k": _q("gsm8k", FieldMap("question", "answer", "gsm8k")),
    "mawps": _q("mawps", FieldMap("input", "target", keep=("type",))),
    **{
        f"mawps-{sub}": _q("mawps", FieldMap("input", "target"), f"{sub}.jsonl")
        for sub in ("addsub", "multiarith", "singleeq", "singleop")
    },
    "minerva_math": _q("minerva_math", FieldMap("problem", "solution", "boxed", keep=("type",))),
    "mmlu_stem": _q(
        "mmlu_stem", FieldMap("question", "answer", "choice_index", options="choices")
    ),
    "olympiadbench": _q("olympiadbench", FieldMap("question", "final_answer", "list", id="id")),
    "sat_math": _q("sat_math", FieldMap("question", "Answer", options="options", id="id")),
    "svamp": _q("svamp", FieldMap(("Body", "Question"), "Answer", id="ID")),
}


def data_root() -> Path:
    """``$TIRFORGE_DATA`` if set, else ``../shared/data`` next to the repository (it may not
    exist: a plain clone has no data folder; ``resolve`` looks further). Raises
    ``hub.DataRootMissing`` when ``$TIRFORGE_DATA`` is set to no folder."""
    return hub.env_data_root() or shared_data()


def shared_data() -> Path:
    """``../shared/data`` relative to the repository root."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class DatasetNotFoundError(FileNotFoundError):
    """A named benchmark has no local copy and may not (or cannot) be fetched from the Hub."""


def _local_candidates(spec: DatasetSpec) -> list[Path]:
    roots = [r] if (r := hub.env_data_root()) else []
    roots += [shared_data(), hub.cache_root() / "datasets"]
    return [r / spec.path for r in roots]


def resolve(name: str, *, allow_network: bool = False) -> tuple[Path, FieldMap]:
    """The file a registered benchmark is read from and the field map for that file.

    Order: ``$TIRFORGE_DATA``, ``../shared/data``, the local cache (a copy at
    ``<cache>/datasets/<path>``, then earlier Hub downloads), then the Hub when ``allow_network``
    and ``HF_HUB_OFFLINE`` is not set (downloaded once into the cache).

    Raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming the variable when
    ``$TIRFORGE_DATA`` is set to no folder, else naming everywhere it looked, the
    ``TIRFORGE_DATA`` variable and the ``--allow-network`` flag; for a set that is not on the
    Hub, it says so and where to get it. ``KeyError`` for an unregistered name.
    """
    spec = DATASETS[name]
    try:
        candidates = _local_candidates(spec)
    except hub.DataRootMissing as e:  # a mistyped TIRFORGE_DATA never falls back silently
        raise DatasetNotFoundError(f"{name}: {e}") from None
    for path in candidates:
        if path.exists():
            return path, spec.fields
    src = hub.hub_source(name)
    if src is not None and src.cache_file().exists():
        return src.cache_file(), src.fields
    looked = "\n".join(f"  {p}" for p in [*candidates, *([src.cache_file()] if src else [])])
    where = (f"{name}: no local copy. Looked in:\n{looked}\n"
             f"Set TIRFORGE_DATA to a folder holding {spec.path}")
    if src is None:
        raise DatasetNotFoundError(
            f"{where}. {name} has {hub.NOT_ON_HUB.format(name=spec.path.split('/', 1)[-1])}."
        )
    if not allow_network or hub.hub_offline():
        raise DatasetNotFoundError(
            f"{where}, or pass --allow-network (and unset HF_HUB_OFFLINE) to download it "
            f"from the Hugging Face Hub: {src.describe()}."
        )
    try:
        return hub.download(src), src.fields
    except Exception as e:  # datasets raises many kinds (connection, not found, auth)
        raise DatasetNotFoundError(
            f"{where}. Downloading {src.describe()} from the Hugging Face Hub failed: "
            f"{type(e).__name__}: {e}"
        ) from e


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or v == []


def _format_options(opts: Any) -> str:
    if isinstance(opts, dict):
        return "\n".join(f"{k}. {v}" for k, v in opts.items())
    if isinstance(opts, list):
        # Some sets already carry "A)..." labels, others are bare choices.
        if all(isinstance(o, str) and re.match(r"^[A-E][).:]", o) for o in opts):
            return "\n".join(opts)
        return "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(opts))
    return str(opts)


def _answer(raw: Any, fmt: AnswerFormat) -> str | None:
    if _empty(raw):
        return None
    if fmt == "gsm8k":
        return reference_answer(str(raw))
    if fmt == "boxed":
        return extract_boxed(str(raw))
    if fmt == "choice_index":
        return chr(65 + int(raw))
    if fmt == "list":
        items = raw if isinstance(raw, list) else [raw]
        return ", ".join(str(x).strip().strip("$").strip() for x in items)
    text = str(raw).strip()
    if fmt == "unit_paren":
        text = re.sub(r"\s*\([^()]*\)\s*$", "", text)
    # "$10-4 n$": the dollars are markup, not part of the answer.
    if len(text) > 1 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text or None


def row_to_problem(row: dict, fm: FieldMap, pid: str, where: str) -> Problem:
    """Map one raw record; ``where`` (``file:line``) goes into every error message."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    names = (fm.problem,) if isinstance(fm.problem, str) else fm.problem
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"{where}: no field {missing[0]!r} (fields: {sorted(row)})")
    text = " ".join(str(row[n]).strip() for n in names if not _empty(row[n]))
    if not text:
        raise ValueError(f"{where}: empty problem in field(s) {names}")
    if fm.options and not _empty(row.get(fm.options)):
        text += "\n" + _format_options(row[fm.options])
    ref = None
    if fm.answer is not None:
        afields = (fm.answer,) if isinstance(fm.answer, str) else fm.answer
        if not any(a in row for a in afields):
            raise ValueError(f"{where}: no answer field {afields[0]!r} (fields: {sorted(row)})")
        for a in afields:
            try:
                ref = _answer(row.get(a), fm.answer_format)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: cannot read answer {row.get(a)!r}: {e}") from e
            if ref:
                if fm.answer_format == "boxed":  # several boxes: trajectories/references.py
                    ref = boxed_reference(str(row[a]), text, row.get("idx"))
                break
        if ref is None and fm.answer_required:
            raise ValueError(f"{where}: empty answer in field(s) {afields}")
    meta = {k: row[k] for k in fm.keep if k in row}
    if fm.id and fm.id in row:
        meta["source_id"] = row[fm.id]
    return Problem(id=pid, problem=text, reference=ref, meta=meta)


def _iter_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """(row, "file:line") for a JSONL / JSON / Parquet file or a saved HF dataset folder."""
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        import datasets

        if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
        else:
            kind = "parquet" if path.suffix == ".parquet" else None
            ds = (
                datasets.load_dataset(kind, data_files=str(path), split="train")
                if kind
                else datasets.load_dataset(str(path), split="train")
            )
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        for i, row in enumerate(ds):
            yield row, f"{path}:row {i}"
        return
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for i, row in enumerate(rows):
            yield row, f"{path}:record {i}"
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            yield row, f"{path}:{lineno}"


def load_file(
    path: str | Path, fields: FieldMap | None = None, *, name: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from any file or HF dataset folder; ids are ``<name>/<row index>``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such dataset file or folder: {path}")
    fm = fields or FieldMap()
    name = name or path.stem
    out: list[Problem] = []
    for i, (row, where) in enumerate(_iter_rows(path)):
        if limit is not None and len(out) >= limit:
            break
        out.append(row_to_problem(row, fm, f"{name}/{i}", where))
    return out


def load_dataset(
    name_or_path: str, fields: FieldMap | None = None, *, limit: int | None = None,
    allow_network: bool = False,
) -> list[Problem]:
    """A registered dataset by name (see ``DATASETS``, found by ``resolve``), else a path with
    ``fields``. ``allow_network``: a named set with no local copy may come from the Hub.

    Raises ``DatasetNotFoundError`` (see ``resolve``), ``ValueError`` for an unknown name or a
    malformed row (``file:line``)."""
    if name_or_path in DATASETS and fields is None:
        path, fm = resolve(name_or_path, allow_network=allow_network)
        return load_file(path, fm, name=name_or_path, limit=limit)
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"{name_or_path!r} is neither a known dataset ({known}) nor a path")
    return load_file(path, fields, limit=limit)
