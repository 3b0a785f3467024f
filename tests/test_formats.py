"""Prompt formats: render -> parse -> render is the identity, and chat renderings agree."""

import pytest

from tirforge.agent.formats import FORMATS, get_format
from tirforge.trajectories import messages
from tirforge.trajectories.schema import Step

CODE = "Let me compute.\n```python\nprint(6 * 7)\n```"


def transcript(name: str) -> list[Step]:
    """Every kind of step a format can produce, in one trajectory."""
    f = get_format(name)
    steps = []
    if f.decompose_prompt:
        steps.append(Step(text=f.decompose_prompt + " add\n2. check", feedback=f.after_decompose))
    if f.uses_tools:
        steps += [
            Step(text="```python\nprint(x)\n```", code="print(x)\n", output="NameError: x",
                 feedback=f.feedback["error"]),
            Step(text="```python\nimport time\ntime.sleep(99)\n```", code="...",
                 output="TimeoutError: cell exceeded 1s", feedback=f.feedback["timeout"]),
            Step(text="```python\nimport os; os._exit(1)\n```", code="...",
                 output="The kernel was restarted", feedback=f.feedback["restart"]),
            Step(text="```python\nx = 1\n```", code="x = 1\n", output="",
                 feedback=f.feedback["empty_output"]),
            Step(text="```python\nprint('open'", feedback=f.feedback["unclosed"]),
            Step(text=CODE, code="print(6 * 7)\n", output="42\n```python nested\n"),
        ]
    steps += [Step(text="I think so.", feedback=f.feedback["no_answer"]), Step(text="42}.")]
    return steps


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip(name):
    f = get_format(name)
    text = f.render_prefix(transcript(name))
    parsed = f.parse_transcript(text)
    assert f.render_prefix(parsed) == text
    assert messages.render_prefix(transcript(name)) == text  # training sees the same text
    assert [s.feedback for s in parsed] == [s.feedback for s in transcript(name)]
    assert [s.output for s in parsed] == [s.output for s in transcript(name)]
    assert [s.code is None for s in parsed] == [s.code is None for s in transcript(name)]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fenced_and_tool_messages_hold_the_same_text(name):
    f = get_format(name)
    steps = transcript(name)
    head = f.build_messages("What is 6*7?")
    fenced = f.to_messages(head, steps, "fenced")
    tool = f.to_messages(head, steps, "tool")
    assert fenced[:2] == tool[:2] == head
    assert [m["role"] for m in fenced[2:]] == ["assistant"]
    # Putting the tool outputs back into fences gives the fenced transcript again.
    rebuilt = "".join(
        m["content"] if m["role"] == "assistant" else f"\n```output\n{m['content']}\n```\n"
        for m in tool[2:]
    )
    assert rebuilt == fenced[2]["content"]
    n_outputs = sum(s.output is not None for s in steps)
    assert sum(m["role"] == "tool" for m in tool) == n_outputs
    assert n_outputs == (0 if name == "qwen-cot" else 5)


def test_parse_turn_per_format():
    tir, cot = get_format("qwen-tir"), get_format("qwen-cot")
    turn = CODE + "\n```output\n41\n```\nSo \\boxed{41}."
    assert tir.parse_turn(turn) == (CODE, "print(6 * 7)", "code")
    assert cot.parse_turn(turn)[1:] == (None, "answer")  # no tools: code is just prose
    assert tir.parse_turn("```python\nprint(1)\n")[2] == "unclosed"
    assert cot.parse_turn("```python\nprint(1)\n")[2] == "no_answer"
    assert tir.stop(CODE) and not cot.stop(CODE)


def test_prompts():
    assert "integrate natural language reasoning with programs" in get_format(
        "qwen-tir").system_prompt
    assert "```python" not in get_format("qwen-cot").build_messages("p")[1]["content"]
    assert "sub-tasks" in get_format("dotamath").system_prompt
    with pytest.raises(ValueError, match="qwen-tir"):
        get_format("nope")


def test_unclosed_output_block_is_an_error():
    with pytest.raises(ValueError, match="unclosed"):
        get_format("qwen-tir").parse_transcript(CODE + "\n```output\n42")
