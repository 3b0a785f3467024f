import random

import pytest
import torch

from tirforge.agent.formats import qwen_tir as fmt
from tirforge.training.masking import IGNORE_INDEX, render, tokenize_trajectory
from tirforge.trajectories.messages import to_segments
from tirforge.trajectories.schema import Step, Trajectory

from .training_utils import tokenizer, toy_trajectory

TEMPLATES = ("smollm", "qwen")
STYLES = ("fenced", "tool")
# Pieces chosen to stress token boundaries: fences, newlines, unicode, digits, specials-like text.
ATOMS = [
    "```", "```\n", "\n```", "``", "`", "\n", " ", "  ", "x", "print(", ")", "42", "3.14",
    "é", "≤", "∑", "数学", "\\boxed{", "}", "output", "```output", "<|im", "end|>", "\t", "🙂",
]


def _rand_text(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return "".join(rng.choice(ATOMS) for _ in range(rng.randint(lo, hi)))


def random_trajectory(rng: random.Random) -> Trajectory:
    steps = []
    for _ in range(rng.randint(1, 4)):
        code = _rand_text(rng, 1, 6)
        steps.append(
            Step(
                text=_rand_text(rng, 1) + f"\n```python\n{code}\n```" + rng.choice(["", "\n", " "]),
                code=code,
                output=rng.choice([None, "", _rand_text(rng, 1), "Traceback\n" + _rand_text(rng)]),
                feedback=rng.choice([None, None, fmt.REFLECT_ERROR, fmt.REFLECT_UNCLOSED + "\n"]),
            )
        )
    if rng.random() < 0.7:  # else: the trajectory ends on an output (max_turns)
        steps.append(Step(text=_rand_text(rng, 1) + "\\boxed{7}"))
    return Trajectory(
        problem="p",
        messages=[
            {"role": "system", "content": _rand_text(rng, 1)},
            {"role": "user", "content": _rand_text(rng, 1) + "```output\n9\n```"},
        ],
        steps=steps,
    )


def _model_written(traj: Trajectory, style: str, eot: str = "<|im_end|>") -> str:
    """What the labels must decode to: each model turn's text, plus end-of-turn where it ended."""
    out = ""
    for m in to_segments(traj, style):
        if m.role != "assistant":
            continue
        out += "".join(s.text for s in m.segments if s.trainable)
        last = next((s for s in reversed(m.segments) if s.text), None)
        if last is not None and last.trainable:
            out += eot
    return out


def _label_text(tok, ex) -> str:
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("style", STYLES)
def test_labels_decode_to_exactly_the_model_written_text(template, style):
    tok = tokenizer(template)
    rng = random.Random(f"{template}-{style}")
    for _ in range(60):
        traj = random_trajectory(rng)
        ex = tokenize_trajectory(traj, tok, style)
        assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
        # The full sequence is the template's rendering, token for token in text.
        full = tok.apply_chat_template([m.to_dict() for m in to_segments(traj, style)],
                                       tokenize=False)
        assert tok.decode(ex["input_ids"], skip_special_tokens=False) == full
        # Labelled tokens: exactly the model's text, nothing lost, nothing from the executor.
        assert _label_text(tok, ex) == _model_written(traj, style)
        pairs = zip(ex["labels"], ex["input_ids"], strict=True)
        assert all(lab in (IGNORE_INDEX, i) for lab, i in pairs)


@pytest.mark.parametrize("template", TEMPLATES)
def test_no_output_text_survives_in_labels(template):
    tok = tokenizer(template)
    marker = "OUTPUTSECRET"
    t = toy_trajectory()
    t.steps[0].output = f"{marker}\n{marker}"
    t.steps.append(Step(text="```python\nx\n```", code="x", output=marker))  # output at the end
    for style in STYLES:
        ex = tokenize_trajectory(t, tok, style)
        assert marker in tok.decode(ex["input_ids"])
        assert marker[:6] not in _label_text(tok, ex)
        assert "```output" not in _label_text(tok, ex)
        assert "Solve with Python" not in _label_text(tok, ex)  # the prompt is masked


def test_token_straddling_model_and_env_text_is_split_not_leaked():
    # Model text ending in a space followed by feedback starting with a word: SmolLM2 merges
    # " So" into one token that spans model and environment text.
    tok = tokenizer("smollm")
    t = toy_trajectory()
    t.steps = [Step(text="I think ", feedback="So the final answer is \\boxed{"), Step(text="5}.")]
    r = render(to_segments(t, "fenced"), tok)
    whole = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(a < r.spans[0][1] < b for a, b in whole), "fixture no longer straddles"
    assert _label_text(tok, tokenize_trajectory(t, tok, "fenced")) == "I think 5}.<|im_end|>"
    # Without splitting, the straddling token is masked: nothing leaks, the space is lost.
    text2 = _label_text(tok, tokenize_trajectory(t, tok, "fenced", split_at_boundaries=False))
    assert text2 == "I think5}.<|im_end|>"


def test_end_of_turn_only_when_the_model_ended_the_turn():
    tok = tokenizer("smollm")
    t = toy_trajectory()
    t.steps = t.steps[:1]  # ends on an output: the model did not write the final <|im_end|>
    assert not _label_text(tok, tokenize_trajectory(t, tok, "fenced")).endswith("<|im_end|>")
    tool = _label_text(tok, tokenize_trajectory(t, tok, "tool"))
    assert tool.endswith("```<|im_end|>")  # the assistant turn before the tool message did
    off = tokenize_trajectory(t, tok, "tool", train_end_of_turn=False)
    assert "<|im_end|>" not in _label_text(tok, off)


def test_truncation_keeps_the_prefix_and_alignment():
    tok = tokenizer("qwen")
    t = toy_trajectory()
    full = tokenize_trajectory(t, tok, "tool")
    for n in (1, 10, len(full["input_ids"]) - 1, len(full["input_ids"]) + 5):
        ex = tokenize_trajectory(t, tok, "tool", max_length=n)
        m = min(n, len(full["input_ids"]))
        assert ex["input_ids"] == full["input_ids"][:m] and ex["labels"] == full["labels"][:m]
    assert set(tokenize_trajectory(t, tok, "tool", max_length=10)["labels"]) == {IGNORE_INDEX}


def test_template_that_edits_content_is_refused():
    tok = tokenizer("smollm")
    strip = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
             "{% endfor %}")
    t = toy_trajectory()
    t.steps[-1].text += "  \n"
    with pytest.raises(ValueError, match="changes message content"):
        render(to_segments(t, "fenced"), tok, chat_template=strip)


def test_output_tokens_get_zero_gradient():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer("smollm")
    ex = tokenize_trajectory(toy_trajectory(), tok, "fenced")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.tensor([ex["input_ids"]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    labels = torch.tensor([ex["labels"]])
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    (grad_logits,) = torch.autograd.grad(loss, logits)
    # d loss / d logits at position i is nonzero iff token i+1 is a label: output tokens as
    # targets contribute nothing.
    target_is_label = labels[0, 1:] != IGNORE_INDEX
    nonzero = grad_logits[0, :-1].abs().sum(-1) > 0
    assert torch.equal(nonzero, target_is_label)
    assert (~target_is_label).sum() > 10 and target_is_label.sum() > 10


def test_qwen_fixture_is_the_upstream_template():
    # tests/fixtures/qwen2_5_chat_template.jinja is the `chat_template` of Qwen2.5-*-Instruct's
    # tokenizer_config.json (default system prompt "You are Qwen, created by Alibaba Cloud. ...").
    # Checked byte for byte (2,507 characters) against two public copies: the JSON string
    # quoted from the Qwen2.5-Instruct tokenizer_config.json in ShishirPatil/gorilla,
    # berkeley-function-call-leaderboard/bfcl/model_handler/local_inference/qwen.py, and a
    # llama.cpp `chatTemplate` for Qwen2.5-Coder-7B-Instruct in a NixOS config; the base
    # Qwen2.5-3B GGUF template differs only in its default system prompt ("You are a helpful
    # assistant."). The hash pins the file against edits.
    import hashlib
    from pathlib import Path

    data = (Path(__file__).parent / "fixtures" / "qwen2_5_chat_template.jinja").read_bytes()
    assert hashlib.sha256(data).hexdigest() == (
        "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
    )
    text = tokenizer("qwen").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
