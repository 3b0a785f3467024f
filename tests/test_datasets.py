"""Loaders on every registered dataset (committed fixtures always, the full files where present),
generic files, malformed input, and where a named dataset is found (local, cache, Hub)."""

import json

import pytest

from tirforge.trajectories import datasets as D
from tirforge.trajectories.datasets import DATASETS, FieldMap, load_dataset, load_file

from .data_files import FIXTURES, full_data

COUNTS = {
    "gsm8k": 1319, "gsm8k-train": 7473, "gsm8k-socratic": 1319, "math": 5000, "math500": 500,
    "aime24": 30, "amc23": 40, "aqua": 254, "asdiv": 2215, "carp_en": 976, "cmath": 600,
    "cn_middle_school": 101, "college_math": 2818, "gaokao2023en": 385, "gaokao2024_I": 14,
    "gaokao2024_II": 14, "gaokao2024_mix": 91, "gaokao_math_cloze": 118, "gaokao_math_qa": 351,
    "qwen-gsm8k": 1319, "mawps": 2065, "mawps-addsub": 395, "mawps-multiarith": 600,
    "mawps-singleeq": 508, "mawps-singleop": 562, "minerva_math": 272, "mmlu_stem": 3018,
    "olympiadbench": 675, "sat_math": 32, "svamp": 1000,
}
# Fixtures: the first 3 rows of each file; 8 of GSM8K; gaokao2023en rows 0, 1 and 167.
FIXTURE_COUNTS = {name: 8 if name == "gsm8k" else 3 for name in COUNTS}


@pytest.fixture
def fixtures(monkeypatch):
    monkeypatch.setenv("TIRFORGE_DATA", str(FIXTURES))


@pytest.fixture
def full(monkeypatch):
    monkeypatch.setenv("TIRFORGE_DATA", str(full_data()))


@pytest.fixture
def no_local_copy(monkeypatch, tmp_path):
    """A clone with no data folder: empty TIRFORGE_DATA, no ../shared, an empty cache."""
    (tmp_path / "data").mkdir()  # set and empty: a missing folder is an error of its own
    monkeypatch.setenv("TIRFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(D, "shared_data", lambda: tmp_path / "no-shared")
    monkeypatch.setenv("TIRFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_every_registered_dataset_is_counted():
    assert set(COUNTS) == set(DATASETS)


def _check(name: str, n: int, missing_expected: list[str]) -> None:
    probs = load_dataset(name)
    assert len(probs) == n
    assert all(p.problem.strip() for p in probs)
    assert len({p.id for p in probs}) == len(probs)
    assert [p.id for p in probs if not p.reference] == missing_expected


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_on_fixtures(name, fixtures):
    # gaokao2023en's third fixture row is one of its two HMMT items with an empty answer.
    _check(name, FIXTURE_COUNTS[name], ["gaokao2023en/2"] if name == "gaokao2023en" else [])


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_on_full_files(name, full):
    # gaokao2023en ships two HMMT items with an empty answer; every other set is fully labelled.
    _check(name, COUNTS[name],
           ["gaokao2023en/167", "gaokao2023en/192"] if name == "gaokao2023en" else [])


@pytest.mark.parametrize("where", ["fixtures", "full"])
def test_field_mappings_read_the_right_answers(where, request):
    request.getfixturevalue(where)  # fixture rows are the full files' first rows
    gsm = load_dataset("gsm8k", limit=1)[0]
    assert gsm.reference == "18" and gsm.problem.startswith("Janet")
    assert load_dataset("math", limit=1)[0].reference == "2"  # from the solution's \boxed{}
    assert load_dataset("asdiv", limit=1)[0].reference == "9"  # "9 (apples)"
    svamp = load_dataset("svamp", limit=1)[0]
    assert svamp.problem.startswith("There are 87 oranges") and svamp.problem.endswith("bananas?")
    mmlu = load_dataset("mmlu_stem", limit=1)[0]
    assert mmlu.reference == "C" and "\nA. " in mmlu.problem
    assert load_dataset("olympiadbench", limit=1)[0].reference == "2"  # list ['2']
    assert load_dataset("college_math", limit=1)[0].reference == "10-4 n"  # "$10-4 n$"
    assert "D. " in load_dataset("gaokao_math_qa", limit=1)[0].problem
    assert load_dataset("math500", limit=1)[0].meta["source_id"].startswith("test/")


def test_generic_jsonl_with_field_map(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"q": "1+1?", "sol": "so \\boxed{2}"}) + "\n\n"
                 + json.dumps({"q": "2+2?", "sol": "\\boxed{4}"}) + "\n")
    probs = load_dataset(str(f), FieldMap("q", "sol", "boxed"))
    assert [(p.id, p.reference) for p in probs] == [("mine/0", "2"), ("mine/1", "4")]


def test_parquet_and_hf_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"problem": "3*3?", "answer": "9"}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for src in (tmp_path / "p.parquet", tmp_path / "folder"):
        (p,) = load_file(src)
        assert (p.problem, p.reference) == ("3*3?", "9")


def test_malformed_rows_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "ok", "answer": "1"}\n{"problem": "broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_file(f)
    f.write_text('{"problem": "ok", "answer": "1"}\n{"question": "x", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'problem'"):
        load_file(f)
    f.write_text('{"problem": "ok", "answer": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: empty answer"):
        load_file(f)
    (p,) = load_file(f, FieldMap(answer_required=False))
    assert p.reference is None


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a known dataset"):
        load_dataset("no-such-set")
