import pytest

from tirforge.agent.formats import qwen_tir as fmt
from tirforge.trajectories.messages import render_prefix, to_messages, to_segments
from tirforge.trajectories.schema import Step, Trajectory

from .training_utils import toy_trajectory


def _with_feedback() -> Trajectory:
    t = toy_trajectory()
    t.steps[0].feedback = fmt.REFLECT_ERROR
    t.steps.append(Step(text="```python\nprint(1", feedback=fmt.REFLECT_UNCLOSED + "\n"))
    t.steps.append(Step(text="Done: \\boxed{5}"))
    return t


def test_fenced_is_one_assistant_message_with_output_blocks():
    msgs = to_messages(toy_trajectory(), "fenced")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[-1]["content"] == (
        "Let me compute it.\n```python\nprint(2 + 3)\n```\n```output\n5\n```\n"
        "The sum is \\boxed{5}."
    )


def test_tool_style_alternates_assistant_and_tool():
    msgs = to_messages(toy_trajectory(), "tool")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["content"].endswith("```")
    assert msgs[3]["content"] == "5"
    assert msgs[4]["content"] == "The sum is \\boxed{5}."


def test_feedback_is_not_trainable_in_either_style():
    t = _with_feedback()
    for style in ("fenced", "tool"):
        segs = [s for m in to_segments(t, style) for s in m.segments]
        trainable = "".join(s.text for s in segs if s.trainable)
        assert trainable == "".join(s.text for s in t.steps)
        assert all(not s.trainable for s in segs if s.text.startswith(fmt.REFLECT_ERROR))


def test_render_prefix_agrees_with_agent_format():
    # One layout (trajectories.transcript): what training sees is what the agent's model saw.
    from tirforge.agent.formats import FORMATS

    for t in (toy_trajectory(), _with_feedback()):
        assert to_messages(t, "fenced")[-1]["content"] == render_prefix(t.steps)
        for f in FORMATS.values():
            assert render_prefix(t.steps) == f.render_prefix(t.steps), f.name


def test_output_at_the_end_and_empty_output():
    t = toy_trajectory()
    t.steps = [Step(text="```python\nx=1\n```", code="x=1", output="")]
    assert to_messages(t, "fenced")[-1]["content"].endswith("```output\n\n```\n")
    tool = to_messages(t, "tool")
    assert [m["role"] for m in tool][-2:] == ["assistant", "tool"] and tool[-1]["content"] == ""


def test_bad_input_raises():
    t = toy_trajectory()
    with pytest.raises(ValueError, match="style"):
        to_messages(t, "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no prompt"):
        to_messages(t.model_copy(update={"messages": []}))
    with pytest.raises(ValueError, match="system/user"):
        to_messages(t.model_copy(update={"messages": [{"role": "tool", "content": "x"}]}))


def test_segments_from_messages_round_trips_to_segments():
    from tirforge.trajectories.messages import segments_from_messages

    t = _with_feedback()
    for style in ("fenced", "tool"):
        plain = segments_from_messages(to_messages(t, style))
        exact = to_segments(t, style)
        assert [m.to_dict() for m in plain] == [m.to_dict() for m in exact]
        # Outputs are masked in both; (feedback is only known to be env text in Trajectory records)
        for p, e in zip(plain, exact, strict=True):
            out_p = [s.text for s in p.segments if not s.trainable and "```output" in s.text]
            out_e = [s.text for s in e.segments if not s.trainable and "```output" in s.text]
            assert out_p == out_e
    with pytest.raises(ValueError, match="string role"):
        segments_from_messages([{"role": "user", "content": None}])
