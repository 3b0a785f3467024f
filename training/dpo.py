"""Offline DPO on (correct, incorrect) trajectory pairs of the same problem, on TRL's DPOTrainer.

Each side is tokenised by ``training.masking`` and fitted into ``max_length`` keeping the prompt
head and the end (``training.truncation``); the prompt is everything before the first
model-written character. TRL's collator marks every completion token as scored; ours narrows that
``completion_mask`` to the model-written tokens, so executor outputs and feedback inside a
completion count neither in the policy's nor in the reference's log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tirforge.training.config import TrainConfig, load_tokenizer, train_and_save
from tirforge.training.data import (
    FitReport,
    load_records,
    pair_name,
    preference_pairs,
    require_trajectories,
)
from tirforge.training.masking import IGNORE_INDEX, fit_trajectory


@dataclass
class DPOTrainConfig(TrainConfig):
    output_dir: str = "runs/dpo"
    """Checkpoints, the final model and TensorBoard logs go here."""
    beta: float = 0.1
    """DPO temperature: how far the policy may move from the reference."""
    loss_type: str = "sigmoid"
    """TRL DPO loss (sigmoid = original DPO, ipo, hinge, ...)."""
    max_pairs_per_problem: int = 4
    """At most this many (correct, incorrect) pairs per problem."""
    learning_rate: float = 5e-7
    """Peak learning rate (DPO wants a small one)."""


def pair_example(chosen, rejected, tokenizer, cfg: TrainConfig) -> dict[str, list[int]]:
    """prompt_ids, chosen/rejected ids and their model-written masks (1 = scored), plus
    ``truncated`` (sides cut). Each side is fitted into ``cfg.max_length`` keeping the prompt
    head and its end (``training.truncation``), so the final answers are always compared.

    Raises ``ValueError`` when the prompts differ or a side keeps no model-written token."""
    kw: dict[str, Any] = {"style": cfg.style, "max_length": cfg.max_length}
    fc, fr = fit_trajectory(chosen, tokenizer, **kw), fit_trajectory(rejected, tokenizer, **kw)
    p_c, p_r = fc.input_ids[: fc.prompt_length], fr.input_ids[: fr.prompt_length]
    if p_c != p_r:
        raise ValueError("different prompts")
    out: dict[str, Any] = {"prompt_ids": p_c, "truncated": int(fc.cut > 0) + int(fr.cut > 0)}
    for side, f in (("chosen", fc), ("rejected", fr)):
        mask = [int(lab != IGNORE_INDEX) for lab in f.labels[f.prompt_length:]]
        if not any(mask):
            raise ValueError(f"{side} has no trainable token within max_length={cfg.max_length}")
        out[f"{side}_ids"], out[f"{side}_mask"] = f.input_ids[f.prompt_length:], mask
    return out


def build_dataset(cfg: DPOTrainConfig, tokenizer):
    """Tokenised pairs; bad pairs are skipped and pairs whose sides are the same tokens after
    truncation dropped, both named in one logged line (``FitReport``) before training."""
    from datasets import Dataset

    trajs = require_trajectories(load_records(cfg.train_file), "DPO")
    pairs = preference_pairs(trajs, cfg.max_pairs_per_problem, cfg.seed)
    if not pairs:
        raise ValueError(f"{cfg.train_file}: no problem has both a correct and an incorrect sample")
    report, rows = FitReport("DPO pairs", cfg.max_length), []
    for g, b in pairs:
        try:
            row = pair_example(g, b, tokenizer, cfg)
        except ValueError as e:
            report.skipped.append(f"{pair_name(g, b)} ({e})")
            continue
        report.sequences += 2
        report.truncated += row.pop("truncated")
        if row["chosen_ids"] == row["rejected_ids"]:
            report.identical.append(pair_name(g, b))
            continue
        rows.append(row)
    report.kept = len(rows)
    report.log()
    if not rows:
        raise ValueError(f"no usable pair within max_length={cfg.max_length}: {report.line()}")
    return Dataset.from_list(rows)


def _classes():
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference, pad

    class MaskedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator with completion_mask = our model-written masks."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            import torch

            out = super().torch_call(examples)
            masks = [[0] * len(e["prompt_ids"]) + e["chosen_mask"] for e in examples]
            masks += [[0] * len(e["prompt_ids"]) + e["rejected_mask"] for e in examples]
            if self.max_length is not None:  # a no-op: build_dataset fitted every row already
                masks = [m[: self.max_length] for m in masks]
            mask = pad([torch.tensor(m) for m in masks], padding_value=0, padding_side="right",
                       pad_to_multiple_of=self.pad_to_multiple_of)
            if mask.shape != out["completion_mask"].shape:
                raise RuntimeError("mask and sequence lengths disagree")
            out["completion_mask"] = mask.to(out["completion_mask"].dtype)
            return out

    class MaskedDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps the mask columns for the collator."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenised and masked by build_dataset; TRL would re-extract text prompts.
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "chosen_mask", "rejected_mask"]

    return MaskedPreferenceCollator, MaskedDPOTrainer


def make_trainer(cfg: DPOTrainConfig, model=None):
    from trl import DPOConfig

    collator_cls, trainer_cls = _classes()
    tok = load_tokenizer(cfg)
    args = DPOConfig(
        **cfg.trainer_kwargs(), beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length
    )
    return trainer_cls(
        model=model or cfg.model,
        args=args,
        train_dataset=build_dataset(cfg, tok),
        processing_class=tok,
        data_collator=collator_cls(pad_token_id=tok.pad_token_id, max_length=cfg.max_length),
        peft_config=cfg.peft_config(),
    )


def train(cfg: DPOTrainConfig) -> str:
    """Run DPO; return the folder of the saved final model (or adapter)."""
    return train_and_save(make_trainer(cfg), cfg)
