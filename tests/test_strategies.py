"""Choosing one answer out of N trajectories."""

import pytest

from tirforge.agent.strategies import ExecutionScorer, choose
from tirforge.executors import ExecutionResult
from tirforge.trajectories.schema import Step, Trajectory


def traj(answer, ok=True, feedback=None):
    step = Step(text="t", code="x", execution=ExecutionResult(
        error_name=None if ok else "NameError"), feedback=feedback)
    return Trajectory(problem="q", final_answer=answer, steps=[step])


class Fixed:
    def __init__(self, scores):
        self.scores = scores

    def score(self, trajectories):
        return list(self.scores)


def test_greedy_and_majority_by_equivalence():
    ts = [traj("7"), traj("1/2"), traj("0.5"), traj("7"), traj("\\frac{1}{2}")]
    assert choose(ts, "greedy") is ts[0]
    assert choose(ts, "majority").final_answer == "1/2"  # three spellings of one answer
    assert choose([traj(None), traj(None)], "majority") is not None


def test_best_of_n_and_weighted_majority_follow_the_scorer():
    ts = [traj("3"), traj("4"), traj("3")]
    assert choose(ts, "best-of-n", Fixed([0.1, 0.9, 0.2])).final_answer == "4"
    assert ts[1].score == 0.9  # the score is kept on the trajectory
    # "3" gets 0.1 + 0.2 = 0.3 < 0.9: the weighted vote follows the scorer, not the count.
    assert choose(ts, "weighted-majority", Fixed([0.1, 0.9, 0.2])).final_answer == "4"
    assert choose(ts, "weighted-majority", Fixed([0.5, 0.9, 0.5])).final_answer == "3"


def test_errors_are_clear():
    with pytest.raises(ValueError, match="needs a scorer"):
        choose([traj("1"), traj("2")], "best-of-n")
    with pytest.raises(ValueError, match="unknown strategy"):
        choose([traj("1")], "beam")
    with pytest.raises(ValueError, match="no trajectories"):
        choose([], "greedy")


def test_execution_scorer_prefers_clean_answered_runs():
    clean, broken, silent = traj("5"), traj("5", ok=False, feedback="fix it"), traj(None)
    s = ExecutionScorer().score([clean, broken, silent])
    assert s[0] > s[1] > s[2]
    assert choose([broken, clean], "best-of-n", ExecutionScorer()) is clean
