"""Grading against OpenAI's GSM8K labels, GSM8K-style answers and the per-answer timeout."""

from __future__ import annotations

import json

import pytest

from tirforge.trajectories.grading import Verdict, extract_answer, grade, reference_answer

from .data_files import FIXTURES, full_data

KINDS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.mark.parametrize("where", ["fixtures", "full"])
def test_agrees_with_openai_gsm8k_labels(where: str) -> None:
    root = FIXTURES if where == "fixtures" else full_data()
    path = root / "gsm8k" / "example_model_solutions.jsonl"
    rows = [json.loads(line) for line in path.open()]
    disagree, n = [], 0
    for i, r in enumerate(rows):
        ref = reference_answer(r["ground_truth"])  # ends on "A: 18", not "#### 18"
        assert ref.replace(".", "").lstrip("-").isdigit(), (i, ref)
        for k in KINDS:
            n += 1
            ours = grade(r[k]["solution"], ref) == Verdict.correct
            if ours != r[k]["is_correct"]:
                disagree.append((i, k))
    assert n == {"fixtures": 3 * 4, "full": 5276}[where]
    assert disagree == []  # every disagreement would be a grader bug: each was looked at


@pytest.mark.parametrize(
    "response, reference, verdict",
    [
        ("She makes 9 * 2 = $18\nA: 18", "18", "correct"),
        ("A: 12 eggs", "12", "correct"),
        ("So the total is\nA: $1,250", "1250", "correct"),
        ("The answer is 3.5 liters.", "3.5", "correct"),
        ("The answer is 40%.", "40", "correct"),
        ("#### 1,000,000", "1000000", "correct"),
        ("The answer is 5 times", "5", "incorrect"),  # "times" is not a unit
        ("A: 17", "18", "incorrect"),
        ("Option A: the first", "18", "no_answer"),  # prose after "A:" is not an answer
        ("No final line here.", "18", "no_answer"),
    ],
)
def test_gsm8k_style_answers(response: str, reference: str, verdict: str) -> None:
    assert grade(response, reference) == verdict


def test_a_line_must_close_the_text() -> None:
    # Not a closing "A:" line, so the fallback takes the text's last number instead.
    assert extract_answer("A: 3\nThen 4 more apples") == "4"
    assert reference_answer("work\nA: 2,400") == "2400"

