"""``qwen-tir``: Qwen2.5-Math tool-integrated reasoning (```python, then ```output blocks).

Its prompt and reflection lines are also the building blocks of the other formats.
"""

from tirforge.agent.formats.base import Format

SYSTEM_PROMPT = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
"""Qwen2.5-Math's TIR system prompt (its evaluation code, ``qwen25-math-tir``)."""

# Qwen2.5-Math puts the instruction in the system turn; small general models follow it better
# with an explicit reminder of the mechanics, which costs ~40 tokens.
TOOL_HINT = (
    "Write Python code in a ```python block; it will be run and its output shown to you in an "
    "```output block. Then state the final answer within \\boxed{}."
)

REFLECT_ERROR = (
    "The code above raised an error. Let me read the error message, fix the code and run it again."
)
REFLECT_TIMEOUT = "The code above took too long. Let me write a faster version."
REFLECT_RESTART = (
    "The kernel was restarted, so every variable defined so far is lost. "
    "Let me redefine what I need."
)
REFLECT_UNCLOSED = (
    "\n```\nThe code block above was not closed with ```, so it did not run. "
    "Let me write it again, complete and closed."
)
REFLECT_NO_ANSWER = "\nSo the final answer is \\boxed{"

QWEN_TIR = Format(
    name="qwen-tir",
    system_prompt=SYSTEM_PROMPT,
    tool_hint=TOOL_HINT,
    feedback={
        "error": REFLECT_ERROR + "\n",
        "timeout": REFLECT_TIMEOUT + "\n",
        "restart": REFLECT_RESTART + "\n",
        "empty_output": "The code printed nothing. Let me print the result.\n",
        "unclosed": REFLECT_UNCLOSED + "\n",
        "no_answer": REFLECT_NO_ANSWER,
    },
)
