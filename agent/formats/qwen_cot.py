"""``qwen-cot``: Qwen2.5-Math chain of thought, no tools."""

from tirforge.agent.formats import qwen_tir as fence
from tirforge.agent.formats.base import Format

QWEN_COT = Format(
    name="qwen-cot",
    system_prompt="Please reason step by step, and put your final answer within \\boxed{}.",
    uses_tools=False,
    feedback={"no_answer": fence.REFLECT_NO_ANSWER},
    stop_strings=(),
)
