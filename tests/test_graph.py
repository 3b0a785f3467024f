"""The solve loop on the deterministic replay backend with a real Jupyter kernel."""

import pytest

from tirforge.agent.backends.replay import ReplayBackend, ReplayExhausted
from tirforge.agent.formats import qwen_tir as fmt
from tirforge.agent.graph import AgentConfig, solve
from tirforge.executors import LocalKernelExecutor
from tirforge.trajectories.schema import Trajectory, append_jsonl, read_jsonl

CODE = "Let me compute.\n```python\nx = sum(i**2 for i in range(1, 21))\nprint(x)\n```"


@pytest.fixture(scope="module")
def kernel():
    with LocalKernelExecutor(timeout=10) as k:
        yield k


def run(turns, kernel, **cfg):
    backend = ReplayBackend(turns)
    traj = solve("Sum of squares of 1..20?", backend, kernel, AgentConfig(**cfg), reference="2870")
    return traj, backend


def test_code_runs_then_answer(kernel):
    traj, backend = run([CODE, "The sum is \\boxed{2870}."], kernel)
    assert traj.stop_reason == "answer"
    assert traj.final_answer == "2870"
    assert traj.verdict == "correct"
    assert traj.steps[0].code.strip().startswith("x = sum")
    assert traj.steps[0].execution.stdout.strip() == "2870"
    assert traj.steps[0].output.strip() == "2870"
    # The second turn saw the real kernel output spliced into its prefix.
    assert "```output\n2870\n```" in backend.calls[1].prefix


def test_state_persists_across_turns(kernel):
    second = "Now reuse it.\n```python\nprint(x + 1)\n```"
    traj, _ = run([CODE, second, "\\boxed{2871}"], kernel)
    assert traj.steps[1].output.strip() == "2871"
    assert traj.verdict == "incorrect"


def test_model_never_writes_its_own_output(kernel):
    invented = CODE + "\n```output\n9999\n```\nSo \\boxed{9999}."
    traj, backend = run([invented, "\\boxed{2870}"], kernel)
    assert traj.steps[0].text.endswith("```")  # cut right after the closing fence
    assert "9999" not in traj.steps[0].text
    assert traj.steps[0].output.strip() == "2870"
    assert traj.final_answer == "2870"


def test_error_triggers_reflect(kernel):
    bad = "```python\nprint(undefined_name)\n```"
    good = "Fixed.\n```python\nprint(6*7)\n```"
    traj, backend = run([bad, good, "\\boxed{42}"], kernel)
    first = traj.steps[0]
    assert first.execution.error_name == "NameError"
    assert "NameError" in first.output
    assert first.feedback.strip() == fmt.REFLECT_ERROR
    assert fmt.REFLECT_ERROR in backend.calls[1].prefix
    assert traj.steps[1].feedback is None
    assert traj.final_answer == "42"


def test_boxed_answer_ends_without_running_code(kernel):
    traj, backend = run(["It is \\boxed{2870}.", "never used"], kernel)
    assert len(traj.steps) == 1 and traj.code_cells == []
    assert len(backend.turns) == 1  # the second turn was never requested


def test_turn_budget_ends(kernel):
    loop = "```python\nprint(1)\n```"
    traj, backend = run([loop] * 10, kernel, max_turns=3)
    assert len(traj.steps) == 3
    assert traj.stop_reason == "max_turns"
    assert traj.final_answer is None and traj.verdict == "no_answer"
    assert all(s.execution is not None for s in traj.steps)


def test_unclosed_fence_is_not_run(kernel):
    unclosed = "```python\nprint('never runs')\n"
    traj, backend = run([unclosed, "```python\nprint(5)\n```", "\\boxed{5}"], kernel)
    first = traj.steps[0]
    assert first.code is None and first.execution is None
    assert "not closed" in first.feedback
    assert traj.steps[1].output.strip() == "5"
    assert traj.final_answer == "5"


def test_unclosed_fence_at_budget(kernel):
    traj, _ = run(["```python\nprint(1)\n"], kernel, max_turns=1)
    assert traj.stop_reason == "unclosed_code"
    assert traj.final_answer is None


def test_no_answer_gets_one_nudge(kernel):
    traj, backend = run(["I think it is large.", "2870}"], kernel)
    assert traj.steps[0].feedback == fmt.REFLECT_NO_ANSWER
    assert backend.calls[1].prefix.endswith("\\boxed{")
    assert traj.final_answer == "2870" and traj.verdict == "correct"


def test_no_answer_without_nudge(kernel):
    traj, _ = run(["I think it is large."], kernel, nudge_for_answer=False)
    assert traj.stop_reason == "no_answer" and traj.verdict == "no_answer"


def test_replay_exhausted_is_an_error(kernel):
    with pytest.raises(ReplayExhausted):
        run(["```python\nprint(1)\n```"], kernel)


def test_trajectory_roundtrip_and_replay(kernel, tmp_path):
    traj, _ = run([CODE, "\\boxed{2870}"], kernel)
    path = tmp_path / "t.jsonl"
    append_jsonl(path, traj)
    append_jsonl(path, [traj])
    back = read_jsonl(path)
    assert len(back) == 2 and back[0] == traj
    # Replaying a recorded trajectory re-runs its code in a kernel and reproduces it.
    again = solve(traj.problem, ReplayBackend.from_trajectory(back[0]), kernel,
                  reference=traj.reference)
    assert [s.output for s in again.steps] == [s.output for s in traj.steps]


def test_torn_line_is_reported(tmp_path):
    path = tmp_path / "t.jsonl"
    append_jsonl(path, Trajectory(problem="p"))
    with path.open("a") as f:
        f.write('{"problem": "torn')
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(path)


# -- formats, budgets, reflect policy, events, checkpoints ------------------------------------
from tirforge.agent.formats import get_format  # noqa: E402
from tirforge.agent.graph import solve_stream  # noqa: E402


def test_format_is_recorded_and_prompts_differ(kernel):
    for name in ("qwen-tir", "qwen-cot", "dotamath"):
        traj, backend = run(["plan" if name == "dotamath" else "\\boxed{2870}", "\\boxed{2870}"],
                            kernel, format=name)
        assert traj.format == name
        assert backend.calls[0].messages[0]["content"] == get_format(name).system_prompt


def test_cot_never_runs_code():
    # No executor at all: qwen-cot must not need one, and code in its text is only prose.
    backend = ReplayBackend([CODE + "\nSo \\boxed{2870}."])
    traj = solve("q", backend, None, AgentConfig(format="qwen-cot"), reference="2870")
    assert traj.code_cells == [] and traj.verdict == "correct"
    assert backend.calls[0].stop is None


def test_code_without_executor_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no executor"):
        solve("q", ReplayBackend([CODE]), None)


def test_dotamath_decomposes_first(kernel):
    plan = " sum the squares\n2. report it\n\n```python\nprint(0)\n```"
    traj, backend = run([plan, CODE, "\\boxed{2870}"], kernel, format="dotamath")
    dm = get_format("dotamath")
    first = traj.steps[0]
    assert first.text == dm.decompose_prompt + " sum the squares\n2. report it"
    assert first.code is None and first.feedback == dm.after_decompose
    assert backend.calls[0].prefix == dm.decompose_prompt
    assert backend.calls[1].prefix == dm.render_prefix([first])
    assert traj.steps[1].output.strip() == "2870" and traj.verdict == "correct"


def test_dotamath_decomposition_off(kernel):
    traj, backend = run([CODE, "\\boxed{2870}"], kernel, format="dotamath", decompose=False)
    assert backend.calls[0].prefix == "" and traj.steps[0].code is not None


def test_decompose_needs_a_format_that_has_it(kernel):
    with pytest.raises(ValueError, match="no decomposition"):
        run([CODE], kernel, format="qwen-tir", decompose=True)


def test_dotamath_self_corrects_after_error(kernel):
    bad = "```python\nprint(1/0)\n```"
    traj, backend = run(["plan", bad, CODE, "\\boxed{2870}"], kernel, format="dotamath")
    dm = get_format("dotamath")
    assert traj.steps[1].execution.error_name == "ZeroDivisionError"
    assert traj.steps[1].feedback == dm.feedback["error"]
    assert backend.calls[2].prefix.endswith(dm.feedback["error"])
    assert traj.final_answer == "2870"


def test_timeout_then_restart_then_reflect():
    with LocalKernelExecutor(timeout=1.0) as k:  # the kernel's timeout is the cell timeout
        slow = "```python\nimport time\ntime.sleep(30)\n```"
        die = "```python\nimport os\nx = 5\nos._exit(1)\n```"
        uses_x = "```python\nprint(x)\n```"
        traj, backend = run([slow, die, uses_x, CODE, "\\boxed{2870}"], k)
    kinds = [s.feedback for s in traj.steps[:3]]
    assert kinds == [fmt.REFLECT_TIMEOUT + "\n", fmt.REFLECT_RESTART + "\n",
                     fmt.REFLECT_ERROR + "\n"]
    assert traj.steps[0].execution.timed_out
    assert traj.steps[1].execution.restarted
    assert traj.steps[2].execution.error_name == "NameError"  # x died with the kernel
    assert traj.verdict == "correct" and traj.stop_reason == "answer"


def test_reflect_policy_is_config(kernel):
    bad = "```python\nprint(undefined_name)\n```"
    traj, _ = run([bad, CODE, "\\boxed{2870}"], kernel, reflect_on=())
    assert traj.steps[0].feedback is None and traj.final_answer == "2870"
    silent = "```python\ny = 1\n```"
    traj, _ = run([silent, CODE, "\\boxed{2870}"], kernel,
                  reflect_on=("empty_output",))
    assert traj.steps[0].feedback == get_format("qwen-tir").feedback["empty_output"]
    traj, _ = run([bad, bad, CODE, "\\boxed{2870}"], kernel, max_reflections=1)
    assert [s.feedback is not None for s in traj.steps] == [True, False, False, False]


def test_token_budget(kernel):
    many = "Let me compute this carefully.\n```python\nprint(1)\n```"  # 6 replay "tokens"
    traj, backend = run([many] * 5, kernel, max_tokens=10)
    assert len(traj.steps) == 2 and traj.stop_reason == "max_tokens"
    assert traj.steps[1].execution is not None  # the last turn still ran its code


def test_time_budget(kernel):
    slow = "```python\nimport time\ntime.sleep(0.3)\n```"
    traj, _ = run([slow] * 5, kernel, max_time_s=0.5)
    assert len(traj.steps) == 2 and traj.stop_reason == "max_time"


def test_stream_emits_typed_events(kernel):
    bad = "```python\nprint(undefined_name)\n```"
    items = list(solve_stream("q", ReplayBackend([bad, CODE, "\\boxed{2870}"]), kernel))
    events = [e for n, e in items if n == "event"]
    kinds = [e["kind"] for e in events]
    assert kinds == [
        "step_started", "code", "step_started", "output", "reflection",
        "step_started", "code", "step_started", "output",
        "step_started", "answer",
    ]
    assert events[-1]["text"] == "2870" and "NameError" in events[3]["text"]
    nodes = [n for n, _ in items if n not in ("event", "trajectory")]
    assert nodes == ["generate", "execute", "reflect", "generate", "execute", "generate",
                     "finish"]


# -- run-scoped dependencies: runtime context, one compiled graph, one cell timeout -----------
def test_cell_timeout_is_the_executors(kernel):
    with pytest.warns(DeprecationWarning, match=r"ExecutorConfig\.timeout"):
        cfg = AgentConfig(cell_timeout=60)
    assert "cell_timeout" not in repr(cfg)
    from dataclasses import replace

    assert replace(cfg, max_turns=2).max_turns == 2  # no warning, nothing carried over


def test_one_compiled_graph_serves_every_config(kernel, monkeypatch, tmp_path):
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import StateGraph

    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import compiled_graph

    with pytest.raises(ValueError, match="kind"):
        compiled_graph("threads")  # type: ignore[arg-type]
    compiled_graph("sync")  # warm
    compiles = []
    original = StateGraph.compile
    monkeypatch.setattr(StateGraph, "compile",
                        lambda self, *a, **kw: compiles.append(1) or original(self, *a, **kw))
    assert compiled_graph("sync") is compiled_graph("sync")
    with sqlite3.connect(tmp_path / "t.sqlite", check_same_thread=False) as conn:
        saver = SqliteSaver(conn)
        for i, (name, temp) in enumerate([("qwen-tir", 0.0), ("dotamath", 0.7),
                                          ("qwen-cot", 1.0), ("qwen-tir", 0.3)]):
            turns = ["plan", CODE, "\\boxed{2870}"] if name == "dotamath" else [
                CODE, "\\boxed{2870}"]
            cfg = AgentConfig(format=name, sampling=SamplingParams(temperature=temp))
            backend = ReplayBackend(turns)
            traj = solve("Sum of squares of 1..20?", backend, kernel, cfg, reference="2870",
                         checkpointer=saver if i % 2 else None, thread_id=f"t{i}")
            assert traj.verdict == "correct" and traj.format == name
            assert (traj.steps[0].code is None) == (name != "qwen-tir")
    assert compiles == []  # the same two compiled graphs, whatever the config and checkpointer


def test_the_run_context_reaches_the_requests(kernel):
    from tirforge.agent.graph import RunContext, compiled_graph, initial_state, run_config

    backend = ReplayBackend(["\\boxed{1}"])
    cfg = AgentConfig(max_turns=2)
    final = compiled_graph("sync").invoke(
        initial_state("q", cfg), run_config(cfg),
        context=RunContext(agent=cfg, backend=backend, seed=7, tag="p#0"),
    )
    assert final["final_answer"] == "1"
    assert (backend.calls[0].seed, backend.calls[0].tag) == (7, "p#0")
    with pytest.raises(RuntimeError, match="no model backend"):
        compiled_graph("sync").invoke(initial_state("q", cfg), run_config(cfg),
                                      context=RunContext(agent=cfg))
