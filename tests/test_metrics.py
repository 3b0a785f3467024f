"""Selection metrics: hand-computed cases, then the Qwen2.5-Math reference file."""

import json
from math import comb

import pytest

from tirforge.trajectories.grading import extract_answer, grade
from tirforge.trajectories.metrics import (
    ProblemSamples,
    group_answers,
    maj_at_k,
    pass_at_k,
    rm_at_k,
    score_table,
    weighted_maj_at_k,
)

from .data_files import full_data

REFERENCE = "qwen25_math_eval/eval_rm_maj_example/math_cot_100.jsonl"


def test_pass_at_k_matches_the_definition():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 8, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - comb(7, 4) / comb(10, 4))
    assert pass_at_k(5, 4, 2) == 1.0  # fewer wrong samples than draws
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_answers_group_by_math_equivalence_not_string():
    groups = group_answers(["1/2", "0.5", "\\frac{1}{2}", "2", None, "\\dfrac12", "x=2"])
    assert groups == [0, 0, 0, 1, -1, 0, 1]


def test_majority_uses_equivalence():
    # String counting would pick "7" (2 votes) over three spellings of 1/2.
    answers = ["7", "1/2", "7", "0.5", "\\frac{1}{2}"]
    correct = [False, True, False, True, True]
    assert maj_at_k(answers, correct, 5) == 1.0
    assert maj_at_k(answers, correct, 3) == 0.0  # first 3: "7" twice
    # Ties go to the answer seen first.
    assert maj_at_k(["3", "4"], [False, True], 2) == 0.0
    # No answers at all is a miss, not a crash.
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_rm_at_k_and_weighted_majority():
    correct = [False, True, False, True]
    scores = [0.9, 0.2, 0.1, 0.95]
    assert rm_at_k(correct, scores, 1) == 0.0
    assert rm_at_k(correct, scores, 3) == 0.0  # best of first 3 is sample 0
    assert rm_at_k(correct, scores, 4) == 1.0
    answers = ["5", "6", "5", "6"]
    # Votes: "5" 1.0 vs "6" 1.15 weighted; plain majority ties and "5" came first.
    assert weighted_maj_at_k(answers, correct, scores, 4) == 1.0
    assert maj_at_k(answers, correct, 4) == 0.0


def test_score_table_hand_case():
    problems = [
        ProblemSamples(["1", "2", "1"], [True, False, True], [0.1, 0.9, 0.2]),
        ProblemSamples(["3", "3", "4"], [False, False, True], [0.5, 0.1, 0.7]),
    ]
    row = score_table(problems, 3)
    assert row["mean"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert row["acc@1"] == 50.0
    assert row["pass@3"] == 100.0
    assert row["maj@3"] == 50.0
    assert row["rm@1"] == 50.0
    assert row["rm@3"] == 50.0  # problem 1 picks the wrong "2"; problem 2 picks the right "4"
    with pytest.raises(ValueError, match="fewer than k"):
        score_table(problems, 4)


def _reference_rows():
    # The reference numbers hold for the whole file only: no fixture variant.
    return [json.loads(line) for line in (full_data() / REFERENCE).open()]


def test_reference_file_numbers_from_its_own_labels():
    problems = [
        ProblemSamples(r["pred"], r["score"], [s[0] for s in r["pred_score"]])
        for r in _reference_rows()
    ]
    row = score_table(problems, 8)
    assert row["mean"] == pytest.approx(91.0)
    assert row["rm@1"] == pytest.approx(90.0)
    assert row["rm@8"] == pytest.approx(94.0)
    assert row["maj@8"] == pytest.approx(93.0)


def test_reference_file_regraded_with_our_grader():
    problems = []
    for r in _reference_rows():
        answers = [extract_answer(resp) for resp in r["code"]]
        correct = [a is not None and grade(a, r["answer"], extract=False) == "correct"
                   for a in answers]
        problems.append(ProblemSamples(answers, correct, [s[0] for s in r["pred_score"]]))
    row = score_table(problems, 8)
    # Our grader also accepts "10{,}000" == "10000", which Qwen's grader marked wrong
    # (one sample of 800); everything else agrees with the file's labels.
    assert row["mean"] == pytest.approx(91.125)
    assert row["maj@8"] == pytest.approx(93.0)
    assert row["rm@8"] == pytest.approx(95.0)
