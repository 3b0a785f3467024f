"""``qwen-tir``: Qwen2.5-Math tool-integrated reasoning (```python, then ```output blocks)."""

from tirforge.agent import format as fence
from tirforge.agent.formats.base import Format

QWEN_TIR = Format(
    name="qwen-tir",
    system_prompt=fence.SYSTEM_PROMPT,
    tool_hint=fence.TOOL_HINT,
    feedback={
        "error": fence.REFLECT_ERROR + "\n",
        "timeout": fence.REFLECT_TIMEOUT + "\n",
        "restart": fence.REFLECT_RESTART + "\n",
        "empty_output": "The code printed nothing. Let me print the result.\n",
        "unclosed": fence.REFLECT_UNCLOSED + "\n",
        "no_answer": fence.REFLECT_NO_ANSWER,
    },
)
