"""The settings every tirforge trainer shares, and loading a config from YAML.

Each trainer module (sft, rm, dpo, grpo) subclasses ``TrainConfig`` with its own fields, TRL style;
a YAML file holds any subset of the fields and command-line overrides win over it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    model: str = ""
    """Local model folder or hub id of the policy / base model (apps resolve aliases)."""
    train_file: str = ""
    """Trajectory JSONL (one Trajectory per line) or a saved HF dataset folder."""
    output_dir: str = "runs/train"
    """Checkpoints, the final model and TensorBoard logs go here."""
    style: str = "fenced"
    """Chat layout of a trajectory: ``fenced`` (Qwen TIR, one assistant turn) or ``tool``."""
    chat_template: str | None = None
    """Path to a Jinja chat template replacing the tokenizer's (None: keep the tokenizer's)."""
    max_length: int = 2048
    """Tokens per example; longer ones are cut from the right (SFT) or keep the prompt head and
    the end (RM, DPO: ``training.truncation``)."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    num_train_epochs: float = 1.0
    """Passes over the data (ignored when ``max_steps`` > 0)."""
    max_steps: int = -1
    """Optimiser steps to run; -1: run ``num_train_epochs``."""
    per_device_train_batch_size: int = 1
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimiser step."""
    warmup_steps: float = 0
    """Learning-rate warm-up: a step count, or a float in [0, 1) as a share of all steps."""
    lr_scheduler_type: str = "cosine"
    """Transformers learning-rate schedule name."""
    logging_steps: int = 10
    """Log every this many steps."""
    save_steps: int = 500
    """Checkpoint every this many steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (None: all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or ``latest`` for the newest one in ``output_dir``."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers: tensorboard (logs under output_dir/runs), wandb, none, ..."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory on long trajectories."""
    seed: int = 0
    """Random seed for data order and initialisation."""
    lora: bool = False
    """Train a LoRA adapter (peft) instead of every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters."""

    @classmethod
    def from_yaml(cls: type[C], path: str | Path | None, **overrides: Any) -> C:
        """Fields from a YAML mapping, then ``overrides`` (None values are ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: a config file must be a mapping of field: value")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}; known: {sorted(known)}")
        return cls(**data)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The fields that map 1:1 onto transformers/TRL ``TrainingArguments``."""
        names = (
            "output_dir learning_rate num_train_epochs max_steps per_device_train_batch_size "
            "gradient_accumulation_steps warmup_steps lr_scheduler_type logging_steps save_steps "
            "save_total_limit report_to bf16 gradient_checkpointing seed"
        ).split()
        return {n: getattr(self, n) for n in names}

    def peft_config(self):
        """A peft LoraConfig when ``lora`` is on, else None."""
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type=self._peft_task,
        )

    _peft_task = "CAUSAL_LM"

    def resume_arg(self) -> str | bool | None:
        """What ``Trainer.train(resume_from_checkpoint=...)`` takes."""
        if self.resume_from_checkpoint == "latest":
            return True
        return self.resume_from_checkpoint


def load_tokenizer(cfg: TrainConfig):
    """The model's tokenizer, with the configured chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.chat_template is not None:
        tok.chat_template = Path(cfg.chat_template).read_text()
    if tok.chat_template is None:
        raise ValueError(f"{cfg.model} has no chat template; pass chat_template=PATH")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_and_save(trainer, cfg: TrainConfig) -> str:
    """Train (resuming as ``cfg.resume`` says), save the model and tokenizer to
    ``cfg.output_dir`` and return it: the common end of every trainer module."""
    trainer.train(resume_from_checkpoint=cfg.resume_arg())
    trainer.save_model(cfg.output_dir)  # collective under DeepSpeed/FSDP: every rank calls it
    if trainer.is_world_process_zero():  # one writer for the tokenizer files
        trainer.processing_class.save_pretrained(cfg.output_dir)
    return cfg.output_dir
