"""Choosing one answer out of N trajectories."""

import pytest

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.agent.strategies import ExecutionScorer, choose, summarize_answers
from tirforge.executors import ExecutionResult
from tirforge.trajectories.schema import Step, Trajectory


def traj(answer, ok=True, feedback=None):
    step = Step(text="t", code="x", execution=ExecutionResult(
        error_name=None if ok else "NameError"), feedback=feedback)
    return Trajectory(problem="q", final_answer=answer, steps=[step])


class Scripted:
    """A deterministic, stateless model: ``turns[t]`` lists the alternatives of turn t, and
    sample i of a request with seed s (the request's, else the call's; 0 if None) plays
    alternative ``(s + i) % len``. The turn
    is the number of script turns already in the prefix, so concurrent trajectories, forked
    search branches and N-sample runs (seed + sample) all get their own path."""

    name = "scripted"

    def __init__(self, turns: list[list[str]]):
        self.turns = turns
        self.calls: list[tuple[int, int]] = []
        """(requests, n) of every call."""

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        self.calls.append((len(requests), params.n))
        out = []
        for req in requests:
            t = sum(any(alt in req.prefix for alt in alts) for alts in self.turns)
            alts = self.turns[min(t, len(self.turns) - 1)]
            seed = getattr(req, "seed", None)
            seed = params.seed if seed is None else seed
            for i in range(params.n):
                text = alts[((seed or 0) + i) % len(alts)]
                out.append(Completion(text=text, finish_reason="stop", n_tokens=len(text.split())))
        return out


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
        choose([traj("1")], "step-search")  # a search, not a choice among samples
    with pytest.raises(ValueError, match="no trajectories"):
        choose([], "greedy")


def test_execution_scorer_prefers_clean_answered_runs():
    clean, broken, silent = traj("5"), traj("5", ok=False, feedback="fix it"), traj(None)
    s = ExecutionScorer().score([clean, broken, silent])
    assert s[0] > s[1] > s[2]
    assert choose([broken, clean], "best-of-n", ExecutionScorer()) is clean


def test_summarize_answers_groups_and_counts():
    ts = [traj("1/2"), traj("7"), traj("0.5"), traj(None), traj("\\frac{1}{2}")]
    assert summarize_answers(ts) == "1/2 ×3, 7 ×1, (none) ×1"


# -- `tirforge solve --strategy ...` on the scripted model ----------------------------------

GOOD = "```python\nprint(6 * 7)\n```"
BAD = "```python\nprint(six * 7)\n```"
# Sample k (seed 0 + k) plays alternative k of each turn: sample 0 runs clean code and answers
# 42; sample 1 fails (NameError, a reflection) and answers 41; sample 2 runs clean, answers 41.
SAMPLES = [[GOOD, BAD, GOOD], ["So \\boxed{42}.", "So \\boxed{41}.", "So \\boxed{41}."]]


def solve_cli(monkeypatch, turns, *args):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    backend = Scripted(turns)
    monkeypatch.setattr("tirforge.agent.backends.make_backend", lambda *a, **k: backend)
    r = CliRunner().invoke(app, ["solve", "What is 6 * 7?", "--answer", "42", "--seed", "0",
                                 "--max-turns", "4", *args])
    return r, backend


@pytest.mark.parametrize("strategy,chosen", [
    ("majority", "41"),           # two votes against one
    ("best-of-n", "42"),          # ExecutionScorer: clean code, no reflection
    ("weighted-majority", "41"),  # 1.5 + 0.9 for 41 against 1.5 for 42
])
def test_solve_cli_chooses_among_n_samples(monkeypatch, strategy, chosen):
    r, backend = solve_cli(monkeypatch, SAMPLES, "--strategy", strategy, "--n", "3")
    assert r.exit_code == 0, r.output
    assert f"final answer: {chosen}" in r.output
    assert f"{strategy}: 3 samples: 41 ×2, 42 ×1" in r.output
    assert ("ExecutionScorer" in r.output) == (strategy != "majority")
    assert "python [1]" in r.output and "output" in r.output  # the chosen solution is shown
    assert all(n == 1 for _, n in backend.calls)


def test_solve_cli_step_search(monkeypatch):
    from .test_search import TURNS

    r, backend = solve_cli(monkeypatch, TURNS, "--strategy", "step-search", "--n", "2",
                           "--beam", "2")
    assert r.exit_code == 0, r.output
    assert "step-search: 4 finished: 42 ×2, 13 ×2" in r.output
    assert "3 steps, 10 continuations" in r.output and "step 3: kept" in r.output
    assert backend.calls == [(1, 2), (2, 2), (2, 2)]  # one batched call per step


def test_solve_cli_rejects_bad_options(monkeypatch, tmp_path):
    r, _ = solve_cli(monkeypatch, SAMPLES, "--strategy", "beam")
    assert r.exit_code == 2 and "'beam' is not one of" in r.output  # refused while parsing
    r, _ = solve_cli(monkeypatch, SAMPLES, "--strategy", "best-of-n", "--rm",
                     str(tmp_path / "missing"))
    assert r.exit_code == 2 and "could not load the reward model" in r.output


def test_solve_with_runs_each_strategy_without_the_cli():
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.strategies import ExecutorUnavailable, solve_with
    from tirforge.executors import ExecutorConfig

    agent = AgentConfig(max_turns=4, sampling=SamplingParams(seed=0))  # temperature 0
    exec_cfg = ExecutorConfig(backend="local", sandbox="auto", timeout=10)
    res = solve_with("majority", "What is 6 * 7?", Scripted(SAMPLES), agent, exec_cfg, n=3,
                     reference="42")
    assert res.trajectory.final_answer == "41" and len(res.candidates) == 3
    events: list[str] = []
    res = solve_with("greedy", "What is 6 * 7?", Scripted(SAMPLES), agent, exec_cfg,
                     reference="42", on_event=lambda node, _: events.append(node))
    assert res.trajectory.verdict == "correct" and res.candidates == []
    assert "execute" in events and "generate" in events  # streamed as it ran
    with pytest.raises(ValueError, match="needs a scorer"):
        solve_with("best-of-n", "q", Scripted(SAMPLES), agent, exec_cfg)
    with pytest.raises(ValueError, match="single run"):
        solve_with("majority", "q", Scripted(SAMPLES), agent, exec_cfg, session_db="x.db")
    with pytest.raises(ValueError, match="unknown strategy"):
        solve_with("beam", "q", Scripted(SAMPLES), agent, exec_cfg)
    broken = ExecutorConfig(backend="docker", image="tirforge-no-such-image:none")
    with pytest.raises(ExecutorUnavailable, match="could not start the docker executor"):
        solve_with("greedy", "q", Scripted(SAMPLES), agent, broken)
