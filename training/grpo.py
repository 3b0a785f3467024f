"""GRPO with multi-turn tool rollouts, on TRL's GRPOTrainer (``rollout_func`` + ``env_mask``).

Each rollout is one whole TIR trajectory produced by a ``Rollout`` callable with the live policy
(``tirforge train grpo`` plugs in the agent graph with a sandboxed kernel; tests plug in a small
generator). The trajectory is tokenised by ``training.masking``: the prompt is everything before
the first model-written token, the completion everything up to the last one, and TRL's
``env_mask`` is 1 exactly on model-written tokens, so executor outputs and feedback inside a
completion carry no policy-gradient, KL or entropy term (TRL multiplies its loss mask by it).

Reward (per rollout; GRPO then normalises within each group of ``num_generations``):

    r = r_v                              without a reward model
    r = r_v + (σ(α · r_m) - 1)           with one (Qwen2.5-Math's shaping, α = ``rm_alpha``)

where r_v ∈ {0, 1} is the verifier's verdict against the reference answer and r_m is the
outcome RM's score of the whole trajectory: a correct answer always beats an incorrect one
(r ∈ (0, 1) vs (-1, 0)) and the RM orders samples within each side.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirforge.training import rollout_batch
from tirforge.training.config import TrainConfig, load_tokenizer
from tirforge.trajectories.grading import Verdict, grade
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.tokens import assert_prefix_property

logger = logging.getLogger(__name__)

Rollout = Callable[[list[list[dict]], Any, Any], list[Trajectory]]
"""(prompts as chat messages, live policy model, tokenizer) -> one trajectory per prompt."""


@dataclass
class GRPOTrainConfig(TrainConfig):
    output_dir: str = "runs/grpo"
    """Checkpoints, the final model and TensorBoard logs go here."""
    num_generations: int = 4
    """Rollouts per problem (the GRPO group)."""
    per_device_train_batch_size: int = 4
    """Rollouts per device per step; a multiple of ``num_generations``."""
    max_completion_length: int = 1024
    """Tokens of a whole trajectory after its prompt (model and executor text)."""
    beta: float = 0.0
    """KL coefficient against the reference model (0: no reference model is loaded)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    rm_path: str | None = None
    """An outcome reward model (``tirforge train rm``) to shape the reward; None: verifier only."""
    rm_alpha: float = 0.5
    """α in r = r_v + σ(α·r_m) - 1."""
    learning_rate: float = 1e-6
    """Peak learning rate."""
    max_turns: int = 4
    """Agent turns per rollout (``AgentConfig.max_turns``)."""
    max_new_tokens: int = 256
    """Tokens per agent turn (``SamplingParams.max_new_tokens``)."""
    executor: str = "local"
    """Kernel backend of the rollouts: local or docker (``ExecutorConfig.backend``)."""
    sandbox: str = "auto"
    """Local isolation: auto, bwrap or none (``ExecutorConfig.sandbox``)."""
    timeout: float = 10.0
    """Seconds a code cell may run before the kernel is interrupted (``ExecutorConfig.timeout``)."""
    pool_size: int = 8
    """Kernels in the rollout pool = rollouts in flight at once (``KernelPool`` size); each step's
    rollouts run concurrently through ``agent.runner.run_many`` with batched model calls."""
    max_batch: int = 32
    """Model requests per batched generate call at most (``RunnerConfig.max_batch``)."""
    max_rollout_tokens: int | None = None
    """Tokens the model may generate in a whole rollout (``AgentConfig.max_tokens``; None: only
    ``max_turns`` x ``max_new_tokens``). Each turn runs at most one code cell, so ``max_turns``
    also caps the tool calls."""
    max_output_chars: int = 1000
    """Executor output shown to the model per cell, cut as head + tail
    (``AgentConfig.max_output_chars``)."""
    filter_void_turns: bool = False
    """Exclude from rewards and loss a rollout with a turn that produced neither a closed code
    block nor a boxed answer (SimpleTIR's void-turn filtering, arXiv:2509.02479)."""
    check_prefix_property: bool = False
    """Assert at run time that each turn's prompt extends the previous turn's prompt + sampled
    ids (``trajectories.tokens.assert_prefix_property``); costs one tokenisation per turn."""
    sequential_rollouts: bool = False
    """Roll out one trajectory at a time on one kernel (the old path; benchmarks' baseline)."""


def load_problems(path: str | Path, make_prompt: Callable[[str], list[dict]] | None = None):
    """Rows ``{prompt, problem, reference}``, one per problem, from Trajectory JSONL (its prompt
    messages) or problem JSONL (``problem``, ``reference`` or ``answer``, optional ``messages``)."""
    rows, seen = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        problem, ref = rec.get("problem"), rec.get("reference", rec.get("answer"))
        if not problem or ref is None:
            raise ValueError(f"{path}:{n}: a problem needs `problem` and `reference` (or `answer`)")
        if problem in seen:
            continue
        seen.add(problem)
        messages = rec.get("messages") or (make_prompt(problem) if make_prompt else None)
        if not messages:
            raise ValueError(f"{path}:{n}: no prompt messages and no prompt builder given")
        rows.append({"prompt": messages, "problem": problem, "reference": str(ref)})
    if not rows:
        raise ValueError(f"{path}: no problems")
    return rows


def rollout_example(traj: Trajectory, tokenizer, cfg: GRPOTrainConfig) -> dict[str, list]:
    """prompt_ids, completion_ids, env_mask (1 = sampled by the model) and logprobs of one
    trajectory: the sampled ids verbatim (``training.rollout_batch.rollout_example``)."""
    ex = rollout_batch.rollout_example(traj, tokenizer, cfg.max_completion_length, cfg.style)
    ex.pop("retokenised")
    return ex


def make_rollout_func(rollout: Rollout, cfg: GRPOTrainConfig):
    """Adapt a ``Rollout`` to TRL's ``rollout_func(prompts, trainer) -> dict`` (keys:
    prompt_ids, completion_ids, logprobs, env_mask, trajectory, excluded); logs the step's
    ``tir/*`` statistics (``rollout_batch.batch_stats``) with TRL's own metrics."""

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            trajs = rollout(prompts, model, trainer.processing_class)
        finally:
            model.train(was_training)
        if len(trajs) != len(prompts):
            raise RuntimeError(f"rollout returned {len(trajs)} trajectories for {len(prompts)}")
        out, stats = rollout_batch.rollout_batch(
            trajs, trainer.processing_class, cfg.max_completion_length, cfg.style,
            cfg.filter_void_turns)
        stats["tir/rollout_s"] = time.perf_counter() - t0
        if cfg.check_prefix_property:
            for t in trajs:
                assert_prefix_property(t, trainer.processing_class)
        _log(trainer, stats, "train" if was_training else "eval")
        return out

    return rollout_func


def _log(trainer, stats: dict[str, float], mode: str) -> None:
    """Add ``stats`` to TRL's per-step metrics (averaged and logged, TensorBoard included, at
    each logging step); trainers without that table (tests' stand-ins) skip it."""
    table = getattr(trainer, "_metrics", None)
    if table is None:
        return
    for k, v in stats.items():
        table[mode][k].append(v)
    for k in ("tir/infra_faults", "tir/excluded"):
        if stats[k]:
            logger.warning("GRPO step: %s = %d rollouts dropped from rewards and loss", k, stats[k])


def verifier_reward(completions, reference, trajectory, excluded=None, **_
                    ) -> list[float | None]:
    """r_v: 1.0 if the trajectory's final answer matches the reference, else 0.0; None for an
    excluded rollout (infrastructure fault, void turn), which TRL then leaves out of the group
    statistics and gives advantage 0."""
    out: list[float | None] = []
    excluded = excluded or [None] * len(trajectory)
    for ref, traj, why in zip(reference, trajectory, excluded, strict=True):
        if why is not None:
            out.append(None)
            continue
        ok = traj.final_answer is not None and grade(traj.final_answer, ref, extract=False)
        out.append(1.0 if ok == Verdict.correct else 0.0)
    return out


def rm_reward(scorer, alpha: float):
    """σ(α · r_m) - 1, the RM term of the shaped reward."""

    def rm_shaping(completions, trajectory, excluded=None, **_) -> list[float | None]:
        excluded = excluded or [None] * len(trajectory)
        scores = scorer.score(list(trajectory))
        return [None if why is not None else 1 / (1 + math.exp(-alpha * s))
                - 1 for s, why in zip(scores, excluded, strict=True)]

    return rm_shaping


def make_trainer(cfg: GRPOTrainConfig, rollout: Rollout, problems: list[dict], scorer=None):
    """A TRL GRPOTrainer whose generations are ``rollout``'s multi-turn trajectories."""
    import os

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if cfg.rm_path is not None and scorer is None:
        from tirforge.training.rm import RewardScorer

        scorer = RewardScorer(cfg.rm_path, style=cfg.style)
    reward_funcs: list = [verifier_reward]
    if scorer is not None:
        reward_funcs.append(rm_reward(scorer, cfg.rm_alpha))
    tok = load_tokenizer(cfg)
    args = GRPOConfig(
        **cfg.trainer_kwargs(),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.beta,
        temperature=cfg.temperature,
    )
    return GRPOTrainer(
        model=cfg.model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(problems),
        processing_class=tok,
        peft_config=cfg.peft_config(),
        rollout_func=make_rollout_func(rollout, cfg),
    )


def train(cfg: GRPOTrainConfig, rollout: Rollout, problems: list[dict]) -> str:
    """Run GRPO; return the folder of the saved final model (or adapter)."""
    trainer = make_trainer(cfg, rollout, problems)
    trainer.train(resume_from_checkpoint=cfg.resume_arg())
    trainer.save_model(cfg.output_dir)
    trainer.processing_class.save_pretrained(cfg.output_dir)
    return cfg.output_dir
