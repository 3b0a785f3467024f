"""MATH references with several boxes (trajectories/references.py) and the grading timeout."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tirforge.trajectories import grading
from tirforge.trajectories.datasets import data_root, load_dataset
from tirforge.trajectories.grading import Verdict, answers_equal, grade
from tirforge.trajectories.references import (
    MATH_EXCEPTIONS,
    boxed_reference,
    multi_box_solutions,
)


@pytest.fixture(scope="module")
def math_rows() -> list[dict]:
    path = data_root() / "math" / "test.jsonl"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the shared data folder must be present")
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def math_refs() -> dict[str, str | None]:
    return {p.id: p.reference for p in load_dataset("math")}


@pytest.mark.parametrize(
    ("pid", "expected", "reason"),
    [
        ("math/414", "-2, 1", "'Find all solutions': both boxed roots"),
        ("math/2656", "-10879, 10879", "'Enter all the possible values of b'"),
        ("math/4562", "30^\\circ, 45^\\circ, 105^\\circ", "'Enter the angles ..., by commas'"),
        ("math/91", "161", "the first box is an intermediate form; the last is the answer"),
        ("math/12", "10", "two solutions box the same answer"),
        ("math/333", "-3", "exception: '\\boxed{3} is also accepted' comes last"),
        ("math/4060", "6", "exception: the boxes are the problem's notation"),
        ("math/3837", "4", "\\boxed{\\phantom{2}} blanks are not answers"),
    ],
)
def test_math_multi_box_references(math_refs, pid: str, expected: str, reason: str) -> None:
    assert math_refs[pid] == expected, reason


def test_math_exceptions_match_their_problems(math_rows) -> None:
    by_idx = {r["idx"]: r for r in math_rows}
    for idx, (start, answer) in MATH_EXCEPTIONS.items():
        assert by_idx[idx]["problem"].startswith(start), idx
        assert boxed_reference(by_idx[idx]["solution"], by_idx[idx]["problem"], idx) == answer
    # Another row order (a Hub copy) never applies an override to the wrong problem.
    assert boxed_reference("so \\boxed{7}", "Another problem", 4060) == "7"


def test_multi_box_solutions_are_all_listed(math_rows) -> None:
    listed = multi_box_solutions(math_rows)
    assert 80 <= len(listed) <= 95  # ~90 of 5,000 box more than once (issue 17)
    joined = sorted(idx for idx, _, ref in listed if ref and ", " in ref and "(" not in ref)
    assert joined == [414, 2152, 2549, 2656, 2703, 4559, 4562, 4860]


def test_math_loader_agrees_with_math500(math_refs, math_rows) -> None:
    path = data_root() / "math500" / "test.jsonl"
    answers = {json.loads(line)["problem"]: json.loads(line)["answer"] for line in path.open()}
    shared = [
        (f"math/{i}", answers[r["problem"]])
        for i, r in enumerate(math_rows)
        if r["problem"] in answers
    ]
    assert len(shared) == 500
    bad = [(pid, math_refs[pid], a) for pid, a in shared if not answers_equal(math_refs[pid], a)]
    assert bad == []


# --------------------------------------------------------------------------- timeout


def _hang(*_args) -> bool:
    time.sleep(3)
    return True


def test_a_hanging_parse_never_blocks_worker_threads(monkeypatch) -> None:
    monkeypatch.setattr(grading, "symbolic_equal", _hang)
    monkeypatch.setattr(grading, "_TIMEOUT_S", 0.3)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda i: grade(f"\\boxed{{x+{i}}}", f"{i}+x"), range(8)))
    assert verdicts == [Verdict.incorrect] * 8  # timed out: unequal, never True
    assert time.perf_counter() - t0 < 2.5  # 2 rounds of 0.3 s, not 8 x 3 s
    # Fast paths never reach the symbolic path, so they are immune.
    assert grade("\\boxed{18}", "18.0") == Verdict.correct


def test_a_hanging_parse_times_out_in_the_main_thread(monkeypatch) -> None:
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setattr(grading, "symbolic_equal", _hang)
    monkeypatch.setattr(grading, "_TIMEOUT_S", 1)
    t0 = time.perf_counter()
    assert grade("\\boxed{x+1}", "1+x") == Verdict.incorrect
    assert time.perf_counter() - t0 < 2.5  # SIGALRM after 1 s


def test_real_symbolic_grading_in_threads() -> None:
    pairs = [("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"), ("\\boxed{2x + 5y - 7 = 0}", "0"),
             ("\\boxed{\\cos(\\pi)}", "-1"), ("\\boxed{10^{-30}}", "3 \\cdot 10^{-30}")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda p: grade(*p), pairs))
    assert verdicts == ["correct", "incorrect", "correct", "incorrect"]
