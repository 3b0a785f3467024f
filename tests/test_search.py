"""RM-guided step search: a scripted model with real choices, toy scorers, a real kernel."""

from dataclasses import replace

import pytest

from tirforge.agent.backends.base import SamplingParams
from tirforge.agent.graph import AgentConfig
from tirforge.agent.kernel_state import replay_cells
from tirforge.agent.search import StepSearchConfig, step_search
from tirforge.agent.strategies import ExecutionScorer
from tirforge.executors import ExecutorConfig, make_executor
from tirforge.trajectories.schema import Trajectory

from .test_strategies import Scripted

PROBLEM, REF = "What is 6 * 7?", "42"
MUL = "Multiply.\n```python\nx = 6 * 7\nprint(x)\n```"
ADD = "Add.\n```python\nx = 6 + 7\nprint(x)\n```"
CHECK = "Check.\n```python\nprint('x =', x)\n```"
# Turn 1 forks (x = 42 or x = 13); turn 2 prints x from the kernel, so its output shows which
# kernel state the branch ran in; turn 3 forks again on the answer.
TURNS = [[MUL, ADD], [CHECK], ["So \\boxed{42}.", "So \\boxed{13}."]]


class Prefers:
    """Toy scorer: one point per code output that shows ``value``, two for answering it."""

    def __init__(self, value: str):
        self.value = value
        self.seen: list[int] = []

    def score(self, trajectories: list[Trajectory]) -> list[float]:
        self.seen.append(len(trajectories))
        return [
            sum(self.value in (s.output or "") for s in t.steps)
            + 2.0 * (t.final_answer == self.value)
            for t in trajectories
        ]


@pytest.fixture(scope="module")
def kernel():
    k = make_executor(ExecutorConfig(backend="local", timeout=10))
    k.start()
    yield k
    k.close()


def search(kernel, scorer, turns=TURNS, **kw):
    cfg = StepSearchConfig(
        agent=AgentConfig(max_turns=6, sampling=SamplingParams(temperature=0.7)), **kw
    )
    backend = Scripted(turns)
    return step_search(PROBLEM, backend, kernel, scorer, cfg, reference=REF), backend


@pytest.mark.parametrize("beam", [1, 2])
def test_search_follows_the_scorer(kernel, beam):
    res, backend = search(kernel, Prefers("42"), beam_width=beam, expansions_per_step=2)
    best = res.best
    assert best.steps[0].text == MUL and best.final_answer == "42"
    assert best.verdict == "correct" and best.stop_reason == "answer"
    # The check cell ran in this branch's kernel state, not the last sibling's (x = 13).
    assert best.steps[1].output.strip() == "x = 42"
    assert res.steps == 3
    # One batched call per step: every open beam in it, M samples each.
    assert [n for _, n in backend.calls] == [2, 2, 2]
    assert backend.calls[1][0] == beam
    assert all(t.score is not None for t in res.finished)
    assert best.score == max(t.score for t in res.finished)


@pytest.mark.parametrize("state", ["replay", "fork"])
def test_the_other_scorer_flips_the_result(kernel, state):
    res, _ = search(kernel, Prefers("13"), beam_width=2, expansions_per_step=2,
                    kernel_state=state)
    assert res.best.steps[0].text == ADD and res.best.final_answer == "13"
    assert res.best.steps[1].output.strip() == "x = 13"
    assert res.best.verdict == "incorrect"
    # Both beams finished with both answers: four finished candidates, all graded.
    assert sorted(t.final_answer for t in res.finished) == ["13", "13", "42", "42"]
    assert {t.verdict for t in res.finished} == {"correct", "incorrect"}
    assert res.kernel_state == state
    if state == "replay":
        assert res.replayed_cells > 0 and res.forks == 0  # siblings shared one kernel
    else:  # every candidate that ran code forked its node's kernel; nothing was re-run
        assert res.replayed_cells == 0 and res.forks == 4


def test_partial_trajectories_reach_the_scorer(kernel):
    scorer = Prefers("42")
    res, _ = search(kernel, scorer, beam_width=2, expansions_per_step=2)
    # Step 1: 2 children of the root; step 2: one (deduplicated) check per beam; step 3: 2 x 2.
    assert scorer.seen == [2, 2, 4]
    assert res.beam_scores[0] == [1.0, 0.0]


def test_duplicates_are_dropped_unless_asked(kernel):
    res, _ = search(kernel, Prefers("42"), beam_width=1, expansions_per_step=3)
    assert res.expansions == 9 and res.best.final_answer == "42"
    res, _ = search(kernel, Prefers("42"), beam_width=1, expansions_per_step=3, dedupe=False)
    assert res.best.final_answer == "42" and len(res.finished) == 3  # 42, 13, 42


def test_budgets_end_the_search(kernel):
    # One step only: nothing has finished, the best partial trajectory comes back.
    res, _ = search(kernel, Prefers("42"), beam_width=2, expansions_per_step=2, max_steps=1)
    assert res.finished == [] and res.steps == 1
    assert res.best.stop_reason == "max_turns" and res.best.final_answer is None
    assert res.best.steps[0].text == MUL and res.best.verdict == "no_answer"
    # An expansion budget: 2 + 1 continuations, then stop.
    res, backend = search(kernel, Prefers("42"), beam_width=2, expansions_per_step=2,
                          max_expansions=3)
    assert res.expansions == 3 and [n for _, n in backend.calls] == [2, 1]
    # The agent's own turn budget ends every branch: a model that only writes code.
    loop = [[f"```python\nprint({i})\n```" for i in range(3)]] * 4
    cfg = StepSearchConfig(beam_width=2, expansions_per_step=2,
                           agent=AgentConfig(max_turns=2, sampling=SamplingParams(seed=5)))
    res = step_search(PROBLEM, Scripted(loop), kernel, ExecutionScorer(), cfg)
    assert res.finished and all(t.stop_reason == "max_turns" for t in res.finished)
    assert res.steps == 2


def test_errors_and_restarts_are_replayed_faithfully(kernel):
    bad = "Oops.\n```python\ny = 1\nprint(undefined)\n```"
    fix = "Fix.\n```python\nprint(y + 1)\n```"
    turns = [[bad], [fix, fix + " "], ["\\boxed{2}"]]
    res, _ = search(kernel, ExecutionScorer(), turns=turns, beam_width=2, expansions_per_step=2)
    # The error's partial effect (y = 1) survived the replay for the second branch too.
    assert {t.steps[1].output.strip() for t in res.finished} == {"2"}
    assert res.best.steps[0].feedback  # the reflection after the error is part of the path
    steps = res.best.steps
    restarted = steps[0].model_copy(update={"execution": steps[0].execution.model_copy(
        update={"restarted": True})})
    assert replay_cells([restarted, *steps[1:]]) == [steps[1].code]
    assert replay_cells(steps[1:], before=["z = 0"]) == ["z = 0", steps[1].code]
    timed = steps[1].model_copy(update={"execution": steps[1].execution.model_copy(
        update={"timed_out": True})})
    assert replay_cells([steps[0], timed]) == [steps[0].code]  # not waited for again
    assert replay_cells([restarted], before=["z = 0"]) == []


def test_formats_without_code_and_missing_kernel():
    cot = [["Half of 84 is \\boxed{42}.", "It is \\boxed{41}."]]
    cfg = StepSearchConfig(agent=AgentConfig(format="qwen-cot",
                                             sampling=SamplingParams(temperature=0.7)))
    res = step_search(PROBLEM, Scripted(cot), None, Prefers("42"), cfg, reference=REF)
    assert res.best.final_answer == "42" and res.steps == 1
    with pytest.raises(ValueError, match="give a kernel"):
        step_search(PROBLEM, Scripted(TURNS), None, Prefers("42"),
                    replace(cfg, agent=AgentConfig()))
