"""Step-level value model learned offline from logged trajectories (MCRL-style), for step search.

State = problem + steps so far (code outputs and feedback are context, never labels); action =
the next step; return = the final verdict. The model is the outcome RM's architecture (a scalar
head on the policy, ``training.rm.load_rm``: float32, seeded head init) read at every step
boundary of a trajectory in one forward pass (``training.value_data.encode_steps``): the head's
output at the boundary token is the logit of "this state leads to a correct finish".

Offline value learning from a fixed log follows MCRL (Monte-Carlo targets from logged
returns, a conservatively learned value and contrastive state-action pairs). Losses, each
switchable so they can be ablated:

* ``value_loss`` — ``bce`` (binary cross-entropy with soft labels) or ``mse`` (on σ(v)) towards
  the Monte-Carlo target of each boundary (``value_data.mc_targets``); ``none`` turns it off.
* ``conservative_weight`` — conservative value learning after CQL (Kumar et al. 2020,
  "Conservative Q-Learning for Offline Reinforcement Learning", the CQL(H) regulariser
  ``logsumexp_a Q(s,a) - E_data Q(s,a)``, here over two actions): at a boundary
  where the data took step a, a step the data never took there (a step of another problem or a
  perturbed copy, ``value_data.unsupported_step``) is scored too, and
  ``logsumexp(v(s,a_data), v(s,a_unsupported)) - v(s,a_data)`` pushes the unsupported value down
  against the supported one, so the search is not lured by steps off the data's support.
* ``contrastive_weight`` — on (prefix, next step) pairs that share a prefix, where one trajectory
  finished correct and the other did not, ``-log σ(v(s,a⁺) - v(s,a⁻))`` (Bradley-Terry at the
  first step where they diverge).

``ValueScorer.score(trajectories) -> list[float]`` is σ(v) at the last step: a ``Scorer``
(``agent.strategies``) that step search takes unchanged (``--value PATH``).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tirforge.training.config import TrainConfig, load_tokenizer, train_and_save
from tirforge.training.data import load_records, require_trajectories
from tirforge.training.rm import load_rm
from tirforge.training.value_data import (
    Encoded,
    encode_steps,
    first_divergence,
    mc_targets,
    problem_key,
    step_key,
    unsupported_step,
)
from tirforge.trajectories.schema import Trajectory

log = logging.getLogger("tirforge.training")


@dataclass
class ValueTrainConfig(TrainConfig):
    output_dir: str = "runs/value"
    """Checkpoints, the final model and TensorBoard logs go here."""
    value_loss: Literal["bce", "mse", "none"] = "bce"
    """Loss towards each boundary's Monte-Carlo value: cross-entropy, squared error, or off."""
    conservative_weight: float = 0.5
    """Weight of the CQL-style term pushing down unsupported steps (0: off)."""
    conservative_source: Literal["other-problem", "perturbed", "both"] = "both"
    """Where unsupported steps come from: other problems' steps, perturbed numbers, or either."""
    contrastive_weight: float = 0.5
    """Weight of the Bradley-Terry term on diverging (correct, incorrect) next steps (0: off)."""
    max_group_size: int = 8
    """Trajectories of one problem per example (problems with more are subsampled)."""
    max_pairs_per_problem: int = 8
    """Contrastive (correct, incorrect) pairs per problem at most."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    # -- targets from fresh rollouts (agent.pipelines.value_targets; off at rollouts=0) --------
    rollouts: int = 0
    """K: fresh rollouts of the policy from each step prefix, on a kernel restored to the
    prefix's state; the target mixes their share correct with the logged one (rollout_mix).
    0: targets from the logged trajectories only."""
    max_prefixes_per_problem: int = 0
    """Distinct step prefixes rolled out per problem at most, drawn at random (0: all)."""
    rollout_mix: Literal["pool", "rollouts"] = "pool"
    """``pool``: rollouts and logged trajectories sharing the prefix count as one sample set;
    ``rollouts``: the fresh rollouts alone (``training.value_rollouts``)."""
    rollout_model: str | None = None
    """Policy that continues the prefixes: alias, folder or hub id (None: ``model``)."""
    rollout_backend: str = "transformers"
    """Agent backend of the rollout policy: transformers, vllm, openai."""
    rollout_base_url: str | None = None
    """Server URL for the openai backend."""
    rollout_max_turns: int = 4
    """Model turns each rollout may add after its prefix."""
    rollout_max_new_tokens: int = 512
    """Tokens per rollout turn at most."""
    rollout_temperature: float = 0.7
    """Sampling temperature of the rollouts (above 0, or the K rollouts are alike)."""
    rollout_top_p: float = 0.95
    """Nucleus sampling of the rollouts."""
    rollout_concurrency: int = 4
    """Prefixes rolled out at once (kernels leased; model calls are batched across them)."""
    rollout_executor: Literal["local", "docker"] = "local"
    """Sandbox of the rollouts' kernels."""
    rollout_cell_timeout: float = 10.0
    """Seconds a rollout's cell may run."""
    rollout_cache: str | None = None
    """JSONL of finished prefixes' rollout outcomes, read on resume (None:
    ``output_dir``/rollout_targets.jsonl)."""
    _peft_task = "SEQ_CLS"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.style != "fenced":
            raise ValueError("the value model reads the fenced layout (style: fenced)")
        if self.value_loss == "none" and self.conservative_weight <= 0 \
                and self.contrastive_weight <= 0:
            raise ValueError("every value-model loss is off: set value_loss, "
                             "conservative_weight or contrastive_weight")
        if self.rollouts < 0:
            raise ValueError("rollouts must be >= 1 to roll out (0: logged targets only)")
        if self.rollouts and (self.rollout_max_turns < 1 or self.rollout_concurrency < 1
                              or self.max_prefixes_per_problem < 0):
            raise ValueError("rollout_max_turns and rollout_concurrency must be >= 1, "
                             "max_prefixes_per_problem >= 0")
        if self.rollout_mix not in ("pool", "rollouts"):
            raise ValueError(f"rollout_mix must be 'pool' or 'rollouts', not "
                             f"{self.rollout_mix!r}")

    @property
    def rollout_cache_path(self) -> str:
        """Where the rollout targets are cached (``rollout_cache`` or its default)."""
        return self.rollout_cache or str(Path(self.output_dir) / "rollout_targets.jsonl")


# -- examples --------------------------------------------------------------------------------------
def problem_examples(
    trajs: list[Trajectory], tokenizer, cfg: ValueTrainConfig, *, chat_template: str | None = None,
    targets: dict[str, list[float]] | None = None,
) -> list[dict]:
    """One example per problem: its trajectories' ids, boundaries and targets, then the
    unsupported rows, contrastive pairs and conservative pairs (each a (row, step, row, step)
    into the rows). Rows are the group's trajectories first, then one unsupported continuation
    per trajectory (its last boundary is the one read). ``targets``: trajectory id -> value
    after each step (default: the logged Monte-Carlo ``mc_targets``; rollout targets come from
    ``value_rollouts.combine_targets``); a trajectory without targets is left out."""
    rng = random.Random(cfg.seed)
    targets = mc_targets(trajs) if targets is None else targets
    for t in trajs:
        if t.id in targets and len(targets[t.id]) != len(t.steps):
            raise ValueError(f"trajectory {t.id}: {len(targets[t.id])} targets for "
                             f"{len(t.steps)} steps")
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        if t.id in targets and t.steps:
            groups.setdefault(problem_key(t), []).append(t)
    pool = [t for g in groups.values() for t in g[:4]]  # donors of other problems' steps
    out = []
    for key, group in groups.items():
        others = [t for t in rng.sample(pool, min(16, len(pool))) if problem_key(t) != key]
        rng.shuffle(group)
        logged, group = group, group[: cfg.max_group_size]
        enc = [encode_steps(t, tokenizer, cfg.max_length, chat_template) for t in group]
        rows = [_row(e, targets[t.id]) for t, e in zip(group, enc, strict=True)]
        pairs: list[tuple[int, int, int, int]] = []
        if cfg.contrastive_weight > 0:
            good = [i for i, t in enumerate(group) if t.verdict == "correct"]
            bad = [i for i, t in enumerate(group) if t.verdict != "correct"]
            cands = [(g, b) for g in good for b in bad]
            rng.shuffle(cands)
            for g, b in cands:
                d = first_divergence(group[g], group[b])
                if d is not None and None not in (enc[g].bounds[d], enc[b].bounds[d]):
                    pairs.append((g, d, b, d))
                if len(pairs) >= cfg.max_pairs_per_problem:
                    break
        cons: list[tuple[int, int, int, int]] = []
        if cfg.conservative_weight > 0:
            for r, t in enumerate(group):
                i = rng.randrange(len(t.steps))
                prefix = [step_key(s) for s in t.steps[:i]]
                seen = {step_key(u.steps[i]) for u in logged  # every step the data took here
                        if len(u.steps) > i and [step_key(s) for s in u.steps[:i]] == prefix}
                alt = unsupported_step(t, i, others, seen, cfg.conservative_source, rng)
                if alt is None or enc[r].bounds[i] is None:
                    continue
                fake = t.model_copy(update={"steps": [*t.steps[:i], alt]})
                e = encode_steps(fake, tokenizer, cfg.max_length, chat_template)
                rows.append(_row(e, [math.nan] * len(e.bounds)))
                cons.append((r, i, len(rows) - 1, i))
        out.append({"rows": rows, "pairs": pairs, "cons": cons})
    if not out:
        raise ValueError("no graded trajectory with steps: the value model needs verdicts")
    return out


def _row(e: Encoded, targets: list[float]) -> dict:
    # A boundary cut by truncation keeps its place (-1) with no target, so (row, step) indices hold.
    return {"ids": e.input_ids,
            "bounds": [-1 if b is None else b for b in e.bounds],
            "targets": [math.nan if b is None else v for b, v in zip(e.bounds, targets,
                                                                     strict=True)]}


class BoundaryCollator:
    """Flatten problem examples into one right-padded batch with flat boundary indices.

    Output: ``input_ids``/``attention_mask`` (R, T); ``b_row``, ``b_pos`` (N,) the boundary
    tokens; ``b_target`` (N,) Monte-Carlo values (NaN: none); ``pair_pos``/``pair_neg`` (P,)
    and ``cons_data``/``cons_unsup`` (C,) index into the N boundaries."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows, b_row, b_pos, b_tgt = [], [], [], []
        pairs, cons = [], []
        for ex in examples:
            first: list[int] = []  # flat index of each row's first boundary
            for row in ex["rows"]:
                first.append(len(b_pos))
                for p, v in zip(row["bounds"], row["targets"], strict=True):
                    b_row.append(len(rows))
                    b_pos.append(max(p, 0))
                    b_tgt.append(v if p >= 0 else math.nan)
                rows.append(row["ids"])
            pairs += [(first[a] + i, first[b] + j) for a, i, b, j in ex["pairs"]]
            cons += [(first[a] + i, first[b] + j) for a, i, b, j in ex["cons"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1

        def idx(xs: list[tuple[int, int]], k: int) -> torch.Tensor:
            return torch.tensor([x[k] for x in xs], dtype=torch.long)

        return {"input_ids": ids, "attention_mask": mask,
                "b_row": torch.tensor(b_row, dtype=torch.long),
                "b_pos": torch.tensor(b_pos, dtype=torch.long),
                "b_target": torch.tensor(b_tgt, dtype=torch.float),
                "pair_pos": idx(pairs, 0), "pair_neg": idx(pairs, 1),
                "cons_data": idx(cons, 0), "cons_unsup": idx(cons, 1)}


# -- model and losses ------------------------------------------------------------------------------
def _head(model) -> nn.Module:
    """The scalar head of a sequence-classification model (peft-wrapped or not)."""
    named = [(n, m) for n, m in model.named_modules()
             if n.split(".")[-1] in ("score", "classifier")]
    if not named:
        raise ValueError(f"{type(model).__name__} has no `score`/`classifier` head")
    return min(named, key=lambda x: len(x[0]))[1]


def boundary_values(model, input_ids, attention_mask, b_row, b_pos) -> torch.Tensor:
    """Head logits (N,) at the boundary tokens, from one forward pass over the (R, T) batch:
    the head's per-token output (R, T, 1) is captured before the model pools the last token."""
    captured: list[torch.Tensor] = []
    hook = _head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    per_token = captured[-1].squeeze(-1).float()  # (R, T)
    return per_token[b_row, b_pos]


def value_loss_terms(values: torch.Tensor, batch: dict, cfg: ValueTrainConfig) -> dict:
    """The switched-on loss terms (already weighted) for boundary logits ``values`` (N,)."""
    terms: dict[str, torch.Tensor] = {}
    tgt = batch["b_target"].to(values.device)
    has = ~torch.isnan(tgt)
    if cfg.value_loss != "none" and has.any():
        v, t = values[has], tgt[has]
        terms["value"] = (nn.functional.binary_cross_entropy_with_logits(v, t)
                          if cfg.value_loss == "bce"
                          else nn.functional.mse_loss(torch.sigmoid(v), t))
    if cfg.conservative_weight > 0 and len(batch["cons_data"]):
        d, u = values[batch["cons_data"]], values[batch["cons_unsup"]]
        cql = torch.logsumexp(torch.stack([d, u]), dim=0) - d
        terms["conservative"] = cfg.conservative_weight * cql.mean()
    if cfg.contrastive_weight > 0 and len(batch["pair_pos"]):
        diff = values[batch["pair_pos"]] - values[batch["pair_neg"]]
        terms["contrastive"] = cfg.contrastive_weight * -nn.functional.logsigmoid(diff).mean()
    return terms


def _trainer_cls():
    from transformers import Trainer

    class ValueTrainer(Trainer):
        """transformers Trainer whose batches are problems' trajectories read at boundaries."""

        value_cfg: ValueTrainConfig

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            values = boundary_values(model, inputs["input_ids"], inputs["attention_mask"],
                                     inputs["b_row"], inputs["b_pos"])
            terms = value_loss_terms(values, inputs, self.value_cfg)
            loss = sum(terms.values()) if terms else values.sum() * 0.0
            return (loss, {"values": values}) if return_outputs else loss

    return ValueTrainer


def make_trainer(cfg: ValueTrainConfig, targets: dict[str, list[float]] | None = None):
    """A value-model Trainer on ``cfg.train_file``; ``targets`` as ``problem_examples`` takes."""
    from transformers import TrainingArguments, set_seed

    tok = load_tokenizer(cfg)
    set_seed(cfg.seed)  # the new head is initialised the same in every run with this seed
    model = load_rm(cfg.model, tok)
    peft = cfg.peft_config()
    if peft is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft)
    trajs = require_trajectories(load_records(cfg.train_file), "value-model training")
    examples = problem_examples(trajs, tok, cfg, targets=targets)
    log.info("value model: %d problems, %d boundaries, %d contrastive pairs, %d unsupported "
             "steps", len(examples), sum(len(r["bounds"]) for e in examples for r in e["rows"]),
             sum(len(e["pairs"]) for e in examples), sum(len(e["cons"]) for e in examples))
    args = TrainingArguments(**cfg.trainer_kwargs(), remove_unused_columns=False)
    trainer = _trainer_cls()(model=model, args=args, train_dataset=examples,
                             data_collator=BoundaryCollator(tok.pad_token_id),
                             processing_class=tok)
    trainer.value_cfg = cfg
    return trainer


def train(cfg: ValueTrainConfig, targets: dict[str, list[float]] | None = None) -> str:
    """Train the value model; return the folder it was saved to. ``targets``: trajectory id ->
    value after each step (None: logged Monte-Carlo targets). Rollout targets
    (``cfg.rollouts``) are computed by ``agent.pipelines.value_targets.train_value``, which
    calls this."""
    return train_and_save(make_trainer(cfg, targets), cfg)


# -- scoring ---------------------------------------------------------------------------------------
class ValueScorer:
    """Rate partial (or finished) trajectories with a trained value model: σ(v) after the last
    step, the estimated chance that the trajectory finishes correct. A ``Scorer`` for step
    search, best-of-n and ``tirforge score``."""

    def __init__(self, path: str, max_length: int = 4096, batch_size: int = 8,
                 device: str | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if str(self.device).startswith("cpu") else "auto"
        self.model = load_rm(path, self.tokenizer, dtype=dtype).to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.inference_mode()
    def _read(self, trajectories: list[Trajectory]) -> list[tuple[Encoded, list[float]]]:
        """Each trajectory's encoding and σ(v) at its boundaries (at its last token when it has
        no step; 0.0 placeholders where truncation cut a boundary)."""
        out: list[tuple[Encoded, list[float]]] = []
        collate = BoundaryCollator(self.tokenizer.pad_token_id)
        for i in range(0, len(trajectories), self.batch_size):
            chunk = [encode_steps(t, self.tokenizer, self.max_length)
                     for t in trajectories[i : i + self.batch_size]]
            rows = [{"ids": e.input_ids,
                     "bounds": [-1 if b is None else b for b in e.bounds] or [len(e.input_ids) - 1],
                     "targets": [0.0] * max(1, len(e.bounds))} for e in chunk]
            batch = collate([{"rows": rows, "pairs": [], "cons": []}])
            v = torch.sigmoid(boundary_values(
                self.model, batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device), batch["b_row"].to(self.device),
                batch["b_pos"].to(self.device))).tolist()
            at = 0
            for e, r in zip(chunk, rows, strict=True):
                out.append((e, v[at : at + len(r["bounds"])]))
                at += len(r["bounds"])
        return out

    def step_values(self, trajectories: list[Trajectory]) -> list[list[float]]:
        """σ(v) after every step of each trajectory ([] for one without steps); a step cut by
        truncation gets NaN."""
        return [[math.nan if b is None else x for b, x in zip(e.bounds, vals, strict=False)]
                for e, vals in self._read(trajectories)]

    def score(self, trajectories: list[Trajectory]) -> list[float]:
        """σ(v) at the last step of each trajectory (at the prompt's end for one without); the
        last step's boundary always survives truncation."""
        return [vals[-1] for _, vals in self._read(trajectories)]
