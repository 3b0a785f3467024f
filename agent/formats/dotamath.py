"""``dotamath``: decompose the problem, solve sub-tasks with code, correct itself on failure.

After DotaMath (Li et al., 2024): the assistant first lists sub-tasks, then writes code per
sub-task, and every failed or empty execution is followed by a self-correction line.
"""

from tirforge.agent.formats import qwen_tir as fence
from tirforge.agent.formats.base import Format

DOTAMATH = Format(
    name="dotamath",
    system_prompt=(
        "Break the problem into sub-tasks, solve them with Python programs, check each result "
        "and correct the code when it fails, and put your final answer within \\boxed{}."
    ),
    tool_hint=fence.TOOL_HINT,
    feedback={
        "error": "The code failed. Let me check which sub-task is wrong and correct it.\n",
        "timeout": "The code was too slow. Let me redo this sub-task more efficiently.\n",
        "restart": (
            "The kernel was restarted and every variable was lost. "
            "Let me redefine what the sub-tasks need.\n"
        ),
        "empty_output": "The code printed nothing. Let me print the sub-task's result.\n",
        "unclosed": fence.REFLECT_UNCLOSED + "\n",
        "no_answer": fence.REFLECT_NO_ANSWER,
    },
    decompose_prompt="Let me break the problem into sub-tasks:\n1.",
    after_decompose="\n\nNow I solve the sub-tasks one by one with code.\n",
)
