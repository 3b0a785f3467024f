"""Tests for answer extraction and grading (tirforge.trajectories.grading)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from tirforge.trajectories.datasets import data_root
from tirforge.trajectories.grading import (
    Verdict,
    answers_equal,
    extract_answer,
    extract_boxed,
    grade,
    normalize,
    reference_answer,
)

# The repo is /work/main, the shared data /work/shared/data.
DATA_DIR = data_root()


def _read_jsonl(relative: str) -> list[dict]:
    path = DATA_DIR / relative
    if not path.is_file():
        pytest.fail(f"dataset file {path} is missing: the shared data folder must be present")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- answers_equal

EQUAL = [
    ("42", "42"),
    ("-7", "-7"),
    ("+3", "3"),
    ("0.5", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("2.50", "2.5"),
    (".5", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-1/2"),
    ("0.3333333", "1/3"),
    ("\\sqrt 2", "\\sqrt{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("2\\pi", "\\pi + \\pi"),
    ("(1,2)", "(1, 2)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("{1,2}", "\\{1, 2\\}"),
    ("[-2,7)", "\\left[-2, 7\\right)"),
    ("1,000", "1000"),
    ("1,234,567", "1234567"),
    ("10{,}000", "10000"),
    ("10,\\!080", "10080"),
    ("50\\%", "50"),
    ("50%", "0.5"),
    ("0.5", "50\\%"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("5\\text{ dollars}", "5"),
    ("\\$18.90", "18.9"),
    ("100 square units", "100"),
    ("864 \\mbox{ inches}^2", "864"),
    ("x=5", "5"),
    ("x = 5", "x=5"),
    ("y = 2x + 3", "2x+3"),
    ("x \\in [-2,7]", "[-2,7]"),
    ("\\text{Evelyn}", "Evelyn"),
    ("3+2i", "2i+3"),
    ("(x+1)^2", "x^2+2x+1"),
    ("1e3", "1000"),
]

NOT_EQUAL = [
    ("42", "43"),
    ("-7", "7"),
    ("1/3", "0.333"),
    ("0.5", "0.55"),
    ("\\frac{1}{2}", "\\frac{2}{3}"),
    ("2\\pi", "\\pi"),
    ("\\sqrt{2}", "2"),
    ("(1,2)", "(2,1)"),
    ("[1,2)", "[1,2]"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("5", "50"),
    ("0.05", "5"),  # x/100 only counts when a percent sign is involved
    ("x = 5", "x = 6"),
    ("\\text{Evelyn}", "\\text{Navin}"),
    ("banana", "42"),
    ("", "42"),
]


@pytest.mark.parametrize(("pred", "ref"), EQUAL)
def test_answers_equal(pred: str, ref: str) -> None:
    assert answers_equal(pred, ref)
    assert answers_equal(ref, pred)  # equality is symmetric for all of these


@pytest.mark.parametrize(("pred", "ref"), NOT_EQUAL)
def test_answers_not_equal(pred: str, ref: str) -> None:
    assert not answers_equal(pred, ref)


def test_answers_equal_never_raises() -> None:
    assert answers_equal("\\frac{1}{", "\\frac{1}{2}") is False
    assert answers_equal("x" * 5000, "5") is False


def test_answers_equal_in_worker_threads() -> None:
    # math-verify's signal-based timeouts must be off outside the main thread, not crash.
    pairs = [("2\\sqrt{3}", "\\sqrt{12}"), ("\\frac{\\pi}{2}", "\\pi/2"), ("(1,2)", "(2,1)")]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: answers_equal(*p), pairs))
    assert results == [True, True, False]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$\\dfrac{3}{4}$", "\\frac{3}{4}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("10{,}000", "10000"),
        ("45^{\\circ}.", "45"),
        ("x = \\frac12", "\\frac{1}{2}"),
        ("\\pi r^2", "\\pi r^2"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{{1,2}}", "{1,2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("the answer is $\\boxed 5$", "5"),
        ("\\boxed{3} and then \\boxed{\\frac{1}{", "3"),  # truncated last box is skipped
        ("no box here", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("We get $x=2$, so \\boxed{2}. Check: \\boxed{4}", "4"),
        ("She makes 9 * 2 = $18.\n#### 1,234", "1,234"),
        ("Thus the answer is 42.", "42"),
        ("#### Step 1: add\nSo the answer is 7.", "7"),  # a markdown heading is not "#### N"
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("So the final answer is 3.5", "3.5"),
        ("**Final Answer:** 17", "17"),
        ("I could not solve this.", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 1,234", "1234"),
        ("Hence the area is $\\boxed{12\\pi}$.", "12\\pi"),
        ("  \\frac{3}{4} ", "\\frac{3}{4}"),
    ],
)
def test_reference_answer(solution: str, expected: str) -> None:
    assert reference_answer(solution) == expected


# --------------------------------------------------------------------------- grade


@pytest.mark.parametrize(
    ("response", "reference", "verdict"),
    [
        ("... so the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt3}{2}", "correct"),
        ("\\boxed{1} no wait \\boxed{2}", "2", "correct"),
        ("\\boxed{1} no wait \\boxed{2}", "1", "incorrect"),
        ("#### 1,234", "1234", "correct"),
        ("The answer is 42.", "42", "correct"),
        ("The answer is 41.", "42", "incorrect"),
        ("I give up.", "42", "no_answer"),
        ("\\boxed{}", "42", "no_answer"),
        ("\\boxed{???}", "42", "unparseable"),  # nothing math-like at all
        ("\\boxed{banana}", "42", "incorrect"),  # a word is a (wrong) answer: MATH has text answers
        ("\\boxed{\\text{(C)}}", "\\text{(C)}", "correct"),
    ],
)
def test_grade(response: str, reference: str, verdict: str) -> None:
    assert grade(response, reference) == Verdict(verdict)


def test_grade_bare_answer() -> None:
    assert grade("x = 5", "5", extract=False) is Verdict.correct
    assert grade(None, "5") is Verdict.no_answer
    assert grade("  ", "5", extract=False) is Verdict.no_answer
    assert grade("\\frac{1}{", "5", extract=False) is Verdict.unparseable


def test_grade_needs_a_reference() -> None:
    with pytest.raises(ValueError):
        grade("\\boxed{5}", None)


def test_verdict_is_a_string() -> None:
    assert Verdict.correct == "correct"
    assert {v.value for v in Verdict} == {"correct", "incorrect", "no_answer", "unparseable"}


# --------------------------------------------------------------------------- datasets


def test_math500_gold_solutions_grade_correct() -> None:
    records = _read_jsonl("math500/test.jsonl")
    assert len(records) == 500
    failures = [
        (r["unique_id"], extract_answer(r["solution"]), r["answer"])
        for r in records
        if grade(r["solution"], r["answer"]) is not Verdict.correct
    ]
    rate = 1 - len(failures) / len(records)
    assert rate >= 0.98, f"self-grading rate {rate:.3f}; failures: {failures}"


def test_gsm8k_references_are_numbers() -> None:
    records = _read_jsonl("gsm8k/test.jsonl")
    assert len(records) == 1319
    bad = []
    for r in records:
        ref = reference_answer(r["answer"])
        try:
            Fraction(ref)
        except ValueError:
            bad.append(ref)
    assert not bad, f"GSM8K references that are not numbers: {bad[:10]}"


def test_agrees_with_qwen_grader_on_real_responses() -> None:
    # 100 MATH problems x 8 Qwen2.5-Math responses, each with the Qwen evaluation grader's verdict.
    records = _read_jsonl("qwen25_math_eval/eval_rm_maj_example/math_cot_100.jsonl")
    disagreements = []
    total = 0
    for r in records:
        for response, score in zip(r["code"], r["score"], strict=True):
            total += 1
            ours = grade(response, r["answer"]) is Verdict.correct
            if ours != (str(score) == "True"):
                disagreements.append((r["idx"], extract_answer(response), r["answer"], score))
    # The one known disagreement: "10000" vs "10{,}000", which Qwen's grader marks wrong.
    assert len(disagreements) <= total // 100, disagreements
