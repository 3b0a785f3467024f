"""Helpers for the training tests: the real SmolLM2 tokenizer, tiny random models, toy data."""

from __future__ import annotations

import functools
from pathlib import Path

from tirforge.trajectories.schema import Step, Trajectory

FIXTURES = Path(__file__).parent / "fixtures"
QWEN25_TEMPLATE = (FIXTURES / "qwen2_5_chat_template.jinja").read_text()


@functools.cache
def smollm_path() -> str:
    from tirforge.agent.models import resolve_model

    return str(resolve_model("smollm2"))


def tokenizer(template: str = "smollm"):
    """The real SmolLM2 tokenizer; ``template="qwen"`` swaps in the Qwen2.5 chat template (no Qwen
    tokenizer is available offline, so the Qwen layout is tested on SmolLM2's vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_path())
    if template == "qwen":
        tok.chat_template = QWEN25_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model_dir(tmp_path: Path, arch: str = "llama", num_labels: int | None = None) -> str:
    """Save a tiny random causal LM (or sequence classifier) + the real tokenizer; return dir."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        LlamaConfig,
        Qwen2Config,
    )

    tok = tokenizer("qwen" if arch == "qwen2" else "smollm")
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if num_labels is None:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(cfg)
    out = tmp_path / (f"tiny-{arch}" + ("-cls" if num_labels else ""))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def toy_trajectory(
    a: int = 2, b: int = 3, correct: bool = True, problem_id: str | None = None
) -> Trajectory:
    """A two-step fenced TIR trajectory adding a and b (wrong answer when ``correct`` is False)."""
    ans = a + b if correct else a + b + 1
    code = f"print({a} + {b})"
    return Trajectory(
        problem=f"What is {a} + {b}?",
        problem_id=problem_id or f"toy/{a}+{b}",
        reference=str(a + b),
        messages=[
            {"role": "system", "content": "Solve with Python."},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ],
        steps=[
            Step(
                text=f"Let me compute it.\n```python\n{code}\n```",
                code=code,
                output=str(a + b),
            ),
            Step(text=f"The sum is \\boxed{{{ans}}}."),
        ],
        final_answer=str(ans),
        verdict="correct" if correct else "incorrect",
        stop_reason="answer",
    )
