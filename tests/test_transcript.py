"""The transcript layout (``trajectories.transcript``): fences, prose, output blocks, parsing."""

import pytest

from tirforge.trajectories import transcript as tr
from tirforge.trajectories.schema import Step


def test_parse_code_block_variants():
    assert tr.find_code_block("```python\nx=1\n```")[0] == "x=1"
    assert tr.find_code_block("```py\nx=1\n```\nmore")[0] == "x=1"
    assert tr.find_code_block("```PYTHON  \nx=1\n  ```") == ("x=1", len("```PYTHON  \nx=1\n  ```"))
    assert tr.find_code_block("```\nnot python\n```") is None
    assert tr.find_code_block("```python\nx = '```'\n") is None  # fence inside a string
    assert tr.has_open_code_block("text ```python\nx=1")
    assert not tr.has_open_code_block("```python\nx=1\n```")
    assert tr.has_closed_code_block("a\n```py\nx=1\n```") and not tr.has_closed_code_block("x")
    assert tr.split_prose("Let me see.\n```python\nx=1") == ("Let me see.\n", "```python\nx=1")
    assert tr.split_prose("no code ```\nhere") == ("no code ```\nhere", "")
    assert tr.code_block_start("ab```py\n") == 2 and tr.code_block_start("ab") is None


def test_render_and_pieces():
    steps = [
        Step(text="A\n```python\nprint(1)\n```", code="print(1)\n", output="1",
             feedback="Oops.\n"),
        Step(text="So \\boxed{1}."),
    ]
    pieces = tr.render_pieces(steps)
    assert pieces == [
        (steps[0].text, True), ("\n```output\n1\n```\n", False), ("Oops.\n", False),
        (steps[1].text, True),
    ]
    assert tr.render_prefix(steps) == "".join(p for p, _ in pieces)
    assert tr.render_step(steps[0]) == "".join(p for p, _ in pieces[:3])
    assert tr.render_output("") == "\n```output\n\n```\n"


def test_parse_inverts_render_and_splits_output_blocks():
    steps = [
        Step(text="```python\nx=1\n```", code="x=1", output="", feedback="Print it.\n"),
        Step(text="no code yet", feedback="Print it.\n"),
        Step(text="```py\nprint(x)\n```", code="print(x)", output="1"),
        Step(text="\\boxed{1}"),
    ]
    text = tr.render_prefix(steps)
    parsed = tr.parse_transcript(text, ["Print it.\n"])
    assert tr.render_prefix(parsed) == text
    assert [(s.code, s.output, s.feedback) for s in parsed] == [
        (s.code, s.output, s.feedback) for s in steps
    ]
    # Without tools, a fenced block is prose: one step.
    assert [s.code for s in tr.parse_transcript(text, code=False)] == [None]
    outputs = [p for p, is_out in tr.split_output_blocks(text) if is_out]
    assert outputs == ["\n```output\n\n```\n", "\n```output\n1\n```\n"]
    assert "".join(p for p, _ in tr.split_output_blocks(text)) == text


def test_unclosed_output_block_is_an_error():
    with pytest.raises(ValueError, match="unclosed"):
        tr.parse_transcript("```python\nx=1\n```\n```output\nhalf")
