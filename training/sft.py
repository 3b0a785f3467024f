"""Supervised fine-tuning on trajectories (RFT: correct ones only), on TRL's SFTTrainer.

Examples are tokenised by ``training.masking``: labels only on model-written tokens, so the
prompt, every executor output and the agent's feedback never contribute to the loss. TRL uses a
pre-tokenised dataset's ``labels`` as they are; packing stays off (packing would need the same
masks per packed segment, and the default collator keeps them correct as is).
"""

from __future__ import annotations

from dataclasses import dataclass

from tirforge.training.config import TrainConfig, load_tokenizer, train_and_save
from tirforge.training.data import Record, load_records, only_correct, segments
from tirforge.training.masking import IGNORE_INDEX, render, tokenize_rendered
from tirforge.training.mixture import load_mixture


@dataclass
class SFTTrainConfig(TrainConfig):
    output_dir: str = "runs/sft"
    """Checkpoints, the final model and TensorBoard logs go here."""
    only_correct: bool = True
    """Keep only trajectories graded correct (rejection-sampling fine-tuning)."""
    mixture: list[dict] | None = None
    """Instead of ``train_file``: sources ``{path, count | fraction}`` (``training.mixture``;
    DMT's two stages are two runs with ``dmt_stages``' mixtures)."""
    learning_rate: float = 1e-5
    """Peak learning rate."""


def tokenize_records(
    records: list[Record], tokenizer, cfg: TrainConfig
) -> tuple[list[dict[str, list[int]]], int]:
    """Masked examples for ``records`` and how many were dropped for having no trainable token."""
    out, dropped = [], 0
    for r in records:
        # The tokenizer already carries cfg.chat_template (load_tokenizer).
        ex = tokenize_rendered(render(segments(r, cfg.style), tokenizer), tokenizer, cfg.max_length)
        if any(lab != IGNORE_INDEX for lab in ex["labels"]):
            out.append(ex)
        else:
            dropped += 1
    return out, dropped


def build_dataset(cfg: SFTTrainConfig, tokenizer):
    """The pre-tokenised HF dataset (input_ids, attention_mask, labels) for ``cfg.train_file``."""
    from datasets import Dataset

    if cfg.mixture:
        records = load_mixture(cfg.mixture, cfg.seed)
    else:
        records = load_records(cfg.train_file)
    if cfg.only_correct:
        records = only_correct(records)
    examples, dropped = tokenize_records(records, tokenizer, cfg)
    if not examples:
        raise ValueError(
            f"{cfg.train_file or 'mixture'}: no trainable examples (only_correct="
            f"{cfg.only_correct}; {dropped} dropped: no model token within "
            f"max_length={cfg.max_length})"
        )
    return Dataset.from_list(examples)


def make_trainer(cfg: SFTTrainConfig, model=None, tokenizer=None):
    """A TRL SFTTrainer for ``cfg`` (``model`` / ``tokenizer`` override loading ``cfg.model``)."""
    from trl import SFTConfig, SFTTrainer

    tokenizer = tokenizer or load_tokenizer(cfg)
    args = SFTConfig(
        **cfg.trainer_kwargs(),
        max_length=cfg.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": False},
        remove_unused_columns=True,
    )
    return SFTTrainer(
        model=model or cfg.model,
        args=args,
        train_dataset=build_dataset(cfg, tokenizer),
        processing_class=tokenizer,
        peft_config=cfg.peft_config(),
    )


def train(cfg: SFTTrainConfig) -> str:
    """Run SFT; return the folder of the saved final model (or adapter)."""
    return train_and_save(make_trainer(cfg), cfg)
