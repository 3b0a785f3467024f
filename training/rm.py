"""Outcome reward model: a scalar head on the policy architecture, trained on graded trajectories.

Two losses over trajectories of the same problem (``r`` = the model's score of a whole trajectory):

* ``pairwise`` — Bradley-Terry on (correct, incorrect) pairs, TRL's ``RewardTrainer``:
  ``-log σ(r_correct - r_incorrect)``.
* ``listwise`` — all samples of a problem form one group, scored in one batch. Following the
  Qwen2.5-Math-RM report (Yang et al., 2024, "Qwen2.5-Math Technical Report", §reward model: every
  sampled response of a query in one list, the loss averaged over its k positives × (n-k)
  negatives), each correct sample is contrasted with the whole group by a softmax:
  ``-log( e^{r_i} / (e^{r_i} + Σ_{j incorrect} e^{r_j}) )``, averaged over correct i. With
  ``listwise_mode="pairs"`` it is the report's formula exactly: the mean of
  ``-log σ(r_i - r_j)`` over all (correct i, incorrect j) of the group.

``RewardScorer.score(trajectories) -> list[float]`` applies a trained model; ``tirforge score``
writes the scores into a trajectory file, and step search scores partial trajectories with it.

Training and scoring read a trajectory the same way (``encode``): longer than ``max_length``, it
keeps the prompt head and the end, final answer included (``training.truncation``). Training
examples whose correct and incorrect sides become the same tokens are dropped; the counts are
logged once before training (``training.data.FitReport``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tirforge.training.config import TrainConfig, load_tokenizer, train_and_save
from tirforge.training.data import (
    FitReport,
    by_problem,
    load_records,
    pair_name,
    preference_pairs,
    problem_name,
    require_trajectories,
)
from tirforge.training.masking import fit_trajectory
from tirforge.trajectories.schema import Trajectory

log = logging.getLogger("tirforge.training")


@dataclass
class RMTrainConfig(TrainConfig):
    output_dir: str = "runs/rm"
    """Checkpoints, the final model and TensorBoard logs go here."""
    loss: Literal["pairwise", "listwise"] = "pairwise"
    """Bradley-Terry on pairs (TRL RewardTrainer) or listwise over each problem's samples."""
    listwise_mode: Literal["softmax", "pairs"] = "softmax"
    """Listwise loss: softmax of each correct sample against the group, or all-pairs BT mean."""
    max_pairs_per_problem: int = 8
    """Pairwise: at most this many (correct, incorrect) pairs per problem."""
    max_group_size: int = 8
    """Listwise: at most this many samples per group (problems with more are subsampled)."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    _peft_task = "SEQ_CLS"


def encode_fit(traj: Trajectory, tokenizer, style: str, max_length: int) -> tuple[list[int], int]:
    """(token ids, tokens cut) of a whole trajectory as the RM reads it, in training and scoring
    alike: the chat rendered and tokenised in one piece, then fitted into ``max_length`` keeping
    the prompt head and the end (``training.truncation.keep_end``)."""
    f = fit_trajectory(traj, tokenizer, style, max_length,  # type: ignore[arg-type]
                       split_at_boundaries=False)
    return f.input_ids, f.cut


def encode(traj: Trajectory, tokenizer, style: str, max_length: int) -> list[int]:
    """Token ids of ``traj`` as the RM reads it (see ``encode_fit``)."""
    return encode_fit(traj, tokenizer, style, max_length)[0]


def load_rm(path: str, tokenizer=None, dtype: torch.dtype | str = torch.float32):
    """A sequence-classification model with one output on the architecture at ``path``.

    Loaded in float32 by default, as TRL's trainers load a policy given by path: transformers v5
    would otherwise keep the checkpoint's dtype (``auto``), and a bf16 checkpoint (the cached
    SmolLM2) would then train with bf16 weights and optimiser state, ~5x slower on a CPU without
    native bf16 and with small updates rounded away. ``bf16: true`` is mixed precision on top."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def init_rm(cfg: RMTrainConfig, tokenizer):
    """The model to train: ``load_rm`` after seeding, so the new score head (missing from a
    policy checkpoint, randomly initialised) is the same in every run with the same ``seed``;
    the Trainer seeds only after the model exists."""
    from transformers import set_seed

    set_seed(cfg.seed)
    return load_rm(cfg.model, tokenizer)


# -- pairwise ------------------------------------------------------------------------------------
def pairwise_dataset(cfg: RMTrainConfig, tokenizer):
    from datasets import Dataset

    trajs = require_trajectories(load_records(cfg.train_file), "reward-model training")
    pairs = preference_pairs(trajs, cfg.max_pairs_per_problem, cfg.seed)
    if not pairs:
        raise ValueError(f"{cfg.train_file}: no problem has both a correct and an incorrect sample")
    report, rows = FitReport("RM pairs", cfg.max_length), []
    for g, b in pairs:
        (ci, c_cut), (ri, r_cut) = (encode_fit(t, tokenizer, cfg.style, cfg.max_length)
                                    for t in (g, b))
        report.sequences += 2
        report.truncated += (c_cut > 0) + (r_cut > 0)
        if ci == ri:
            report.identical.append(pair_name(g, b))
        else:
            rows.append({"chosen_ids": ci, "rejected_ids": ri})
    return Dataset.from_list(_reported(report, rows))


def _reported(report: FitReport, rows: list[dict]) -> list[dict]:
    """Log the report once (before training starts); raise when nothing is left."""
    report.kept = len(rows)
    report.log()
    if not rows:
        raise ValueError(f"no usable example within max_length: {report.line()}")
    return rows


def make_pairwise_trainer(cfg: RMTrainConfig):
    from trl import RewardConfig, RewardTrainer

    tok = load_tokenizer(cfg)
    args = RewardConfig(**cfg.trainer_kwargs(), max_length=cfg.max_length)
    return RewardTrainer(
        model=init_rm(cfg, tok),
        args=args,
        train_dataset=pairwise_dataset(cfg, tok),
        processing_class=tok,
        peft_config=cfg.peft_config(),
    )


# -- listwise ------------------------------------------------------------------------------------
def listwise_loss(scores: torch.Tensor, correct: torch.Tensor, mode: str = "softmax"):
    """Loss of one group: ``scores`` (n,) and boolean ``correct`` (n,) with both kinds present."""
    pos, neg = scores[correct], scores[~correct]
    if mode == "pairs":
        return -nn.functional.logsigmoid(pos[:, None] - neg[None, :]).mean()
    # Each positive against itself and every negative: log-sum-exp over [r_i, r_neg...].
    logits = torch.cat([pos[:, None], neg[None, :].expand(len(pos), -1)], dim=1)
    return -(pos - torch.logsumexp(logits, dim=1)).mean()


def listwise_groups(cfg: RMTrainConfig, tokenizer) -> list[dict]:
    """One example per problem with both correct and incorrect samples: ids and correctness.

    A correct and an incorrect sample that are the same tokens after truncation are both left
    out of the group; a group left without both kinds is dropped (named in the ``FitReport``)."""
    rng = random.Random(cfg.seed)
    trajs = require_trajectories(load_records(cfg.train_file), "reward-model training")
    report, groups = FitReport("RM groups", cfg.max_length), []
    for group in by_problem(trajs).values():
        good = [t for t in group if t.verdict == "correct"]
        bad = [t for t in group if t.verdict != "correct"]
        if not good or not bad:
            continue
        # Keep both kinds when subsampling: at least one of each.
        rng.shuffle(good), rng.shuffle(bad)
        k = min(len(good), max(1, cfg.max_group_size - len(bad)))
        chosen = (good[:k] + bad)[: max(cfg.max_group_size, 2)]
        enc = [encode_fit(t, tokenizer, cfg.style, cfg.max_length) for t in chosen]
        report.sequences += len(enc)
        report.truncated += sum(cut > 0 for _, cut in enc)
        ok = [t.verdict == "correct" for t in chosen]
        seen: dict[tuple[int, ...], set[bool]] = {}
        for (ids, _), c in zip(enc, ok, strict=True):
            seen.setdefault(tuple(ids), set()).add(c)
        keep = [i for i, (ids, _) in enumerate(enc) if len(seen[tuple(ids)]) == 1]
        if len(keep) < len(enc):
            report.identical += [f"{problem_name(t)}: {t.id}" for i, t in enumerate(chosen)
                                 if i not in keep]
        if len({ok[i] for i in keep}) < 2:
            report.skipped.append(f"{problem_name(group[0])}: no correct/incorrect pair left")
            continue
        groups.append({"ids": [enc[i][0] for i in keep], "correct": [ok[i] for i in keep]})
    if not groups and not report.skipped:
        raise ValueError(f"{cfg.train_file}: no problem has both a correct and an incorrect sample")
    return _reported(report, groups)


class GroupCollator:
    """Flatten groups into one right-padded batch; ``group`` maps each row to its problem."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        rows = [ids for g in groups for ids in g["ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "correct": torch.tensor([c for g in groups for c in g["correct"]]),
            "group": torch.tensor([i for i, g in enumerate(groups) for _ in g["ids"]]),
        }


def _listwise_trainer_cls():
    from transformers import Trainer

    class ListwiseRewardTrainer(Trainer):
        """transformers Trainer whose batches are groups of one problem's samples."""

        listwise_mode = "softmax"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            correct, group = inputs.pop("correct"), inputs.pop("group")
            scores = model(**inputs, use_cache=False).logits.squeeze(-1)
            losses = [
                listwise_loss(scores[group == g], correct[group == g], self.listwise_mode)
                for g in group.unique()
            ]
            loss = torch.stack(losses).mean()
            return (loss, {"scores": scores}) if return_outputs else loss

    return ListwiseRewardTrainer


def make_listwise_trainer(cfg: RMTrainConfig):
    from datasets import Dataset
    from transformers import TrainingArguments

    tok = load_tokenizer(cfg)
    model = init_rm(cfg, tok)
    peft = cfg.peft_config()
    if peft is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft)
    args = TrainingArguments(**cfg.trainer_kwargs(), remove_unused_columns=False)
    trainer = _listwise_trainer_cls()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(listwise_groups(cfg, tok)),
        data_collator=GroupCollator(tok.pad_token_id),
        processing_class=tok,
    )
    trainer.listwise_mode = cfg.listwise_mode
    return trainer


def make_trainer(cfg: RMTrainConfig):
    if cfg.loss == "pairwise":
        return make_pairwise_trainer(cfg)
    if cfg.loss == "listwise":
        return make_listwise_trainer(cfg)
    raise ValueError(f"unknown RM loss {cfg.loss!r}; expected pairwise or listwise")


def train(cfg: RMTrainConfig) -> str:
    """Train the reward model; return the folder it was saved to."""
    return train_and_save(make_trainer(cfg), cfg)


# -- scoring -------------------------------------------------------------------------------------
class RewardScorer:
    """Score whole trajectories with a trained outcome RM: higher = more likely correct."""

    def __init__(
        self,
        path: str,
        style: str = "fenced",
        max_length: int = 4096,
        batch_size: int = 8,
        device: str | None = None,
    ):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # float32 on a CPU (bf16 matmuls are emulated, ~5x slower); the saved dtype on a GPU.
        dtype = torch.float32 if str(self.device).startswith("cpu") else "auto"
        self.model = load_rm(path, self.tokenizer, dtype=dtype).to(self.device).eval()
        self.style, self.max_length, self.batch_size = style, max_length, batch_size
        self.truncated = 0
        """Trajectories scored so far that were longer than ``max_length`` (head + end kept)."""

    @torch.inference_mode()
    def score(self, trajectories: list[Trajectory]) -> list[float]:
        out: list[float] = []
        collate = GroupCollator(self.tokenizer.pad_token_id)
        for i in range(0, len(trajectories), self.batch_size):
            chunk = trajectories[i : i + self.batch_size]
            fitted = [encode_fit(t, self.tokenizer, self.style, self.max_length) for t in chunk]
            ids = [f[0] for f in fitted]
            cut = sum(f[1] > 0 for f in fitted)
            if cut:
                self.truncated += cut
                log.info("RM scoring: %d of %d trajectories longer than max_length=%d, "
                         "scored on the prompt head and the end", cut, len(chunk),
                         self.max_length)
            batch = collate([{"ids": ids, "correct": [False] * len(ids)}])
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).logits
            out += logits.squeeze(-1).float().tolist()
        return out
