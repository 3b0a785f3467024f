"""RFT distinct-path selection, DPO pairs and consensus labels on crafted trajectories."""

from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.select import (
    SelectConfig,
    consensus,
    dpo_pairs,
    path_signature,
    select_distinct,
)


def traj(code=None, text="", pid="p/0", verdict="correct", score=None, answer="6"):
    steps = [Step(text=text + (f"\n```python\n{code}\n```" if code else ""), code=code)]
    return Trajectory(problem="q", problem_id=pid, steps=steps, verdict=verdict, score=score,
                      final_answer=answer)


def test_renamed_variables_and_comments_are_the_same_path():
    a = traj("x = 2\ny = 3  # the other factor\nprint(x * y)")
    b = traj("# multiply\nfirst = 2\nsecond = 3\n\nprint( first*second )", text="Other prose.")
    c = traj("print(2 * 3)")
    d = traj("import math\nprint(math.prod([2, 3]))")
    assert path_signature(a) == path_signature(b)
    assert len({path_signature(t) for t in (a, c, d)}) == 3


def test_cells_share_one_renaming():
    a = Trajectory(problem="q", steps=[Step(text="", code="a = 1"), Step(text="", code="print(a)")])
    b = Trajectory(problem="q", steps=[Step(text="", code="b = 1"), Step(text="", code="print(b)")])
    c = Trajectory(problem="q", steps=[Step(text="", code="b = 1"), Step(text="", code="print(c)")])
    assert path_signature(a) == path_signature(b) != path_signature(c)


def test_equation_sequence_when_there_is_no_code():
    a = traj(text="She has 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18 dollars.")
    b = traj(text="Eggs left: 16-3-4 = 9. Money: 9*2 = 18.")
    c = traj(text="Money: 2 * 9 = 18 after 16 - 7 = 9 eggs.")
    assert path_signature(a) == path_signature(b) != path_signature(c)


def test_select_keeps_correct_distinct_capped_and_scored():
    trajs = [
        traj("print(2*3)"), traj("print( 2*3 )"),  # duplicate path
        traj("x = 2\nprint(x*3)"), traj("print(6)"), traj("print(12/2)"),
        traj("print(7)", verdict="incorrect", answer="7"),
        traj("print(1+5)", score=-1.0),  # below the score floor
        traj("print(3+3)", pid="p/1"),
    ]
    kept, rep = select_distinct(trajs, SelectConfig(max_per_problem=3, min_score=0.0))
    assert rep.problems == 2 and rep.trajectories == 8 and rep.correct == 7
    assert rep.below_score == 1 and rep.duplicates == 1 and rep.capped == 1
    assert rep.kept == 4 and rep.problems_kept == 2
    sigs = [path_signature(t) for t in kept if t.problem_id == "p/0"]
    assert len(sigs) == 3 == len(set(sigs))
    kept_all, rep_all = select_distinct(trajs, SelectConfig(max_per_problem=None, dedup=False))
    assert rep_all.kept == 7


def test_merging_runs_keeps_a_shared_path_once():
    run_a = [traj("print(2*3)"), traj("print(6)")]
    run_b = [traj("print(2 * 3)"), traj("print(3*2)")]
    kept, rep = select_distinct(run_a + run_b, SelectConfig(max_per_problem=None))
    assert rep.kept == 3 and rep.duplicates == 1


def test_dpo_pairs_are_unique_and_same_problem():
    trajs = [traj("print(6)"), traj("print(2*3)"),
             traj("print(7)", verdict="incorrect"), traj(None, verdict="no_answer"),
             traj("print(5)", pid="p/1", verdict="incorrect")]  # no correct: no pair
    pairs = dpo_pairs(trajs, max_pairs_per_problem=10)
    assert len(pairs) == 4
    assert len({(c.id, r.id) for c, r in pairs}) == 4
    assert all(c.verdict == "correct" and r.verdict != "correct" for c, r in pairs)
    assert all(c.problem_id == r.problem_id == "p/0" for c, r in pairs)
    assert len(dpo_pairs(trajs, max_pairs_per_problem=2)) == 2


def test_infra_faulted_attempts_are_never_rejected_sides():
    """A wrong answer after the kernel died (variables lost) or would not start is the
    machinery's failure, not the model's: no pair uses it; a code error still does."""
    def failed(fault):
        t = traj("print(x)", verdict="incorrect", answer="1")
        t.steps[0].execution = ExecutionResult(ok=False, error="boom", fault=fault)
        return t

    good = traj("print(6)")
    for infra in ("kernel_died", "start_failed", "sandbox_unavailable"):
        assert dpo_pairs([good, failed(infra)]) == []
    pairs = dpo_pairs([good, failed("error"), failed("kernel_died")], max_pairs_per_problem=10)
    assert [r.steps[0].execution.fault for _, r in pairs] == ["error"]


def test_consensus_pools_equivalent_answers():
    vote = consensus(["1/2", "0.5", "\\frac{1}{2}", "3", None], threshold=0.5)
    assert vote.votes == 3 and vote.total == 5 and vote.accepted
    assert vote.agreement == 0.6
    weak = consensus(["1", "2", "3", "1"], threshold=0.6)
    assert weak.answer == "1" and not weak.accepted
    assert consensus([None, ""]).answer is None
    assert not consensus(["7"], min_votes=2).accepted
