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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirforge.training.config import TrainConfig, load_tokenizer
from tirforge.training.masking import IGNORE_INDEX, tokenize_trajectory
from tirforge.trajectories.grading import Verdict, grade
from tirforge.trajectories.schema import Trajectory

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


def rollout_example(traj: Trajectory, tokenizer, cfg: GRPOTrainConfig) -> dict[str, list[int]]:
    """prompt_ids, completion_ids and env_mask (1 = model-written) of one trajectory."""
    ex = tokenize_trajectory(traj, tokenizer, cfg.style)  # type: ignore[arg-type]
    labelled = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    if not labelled:  # the model wrote nothing: one masked token keeps the row well-formed
        return {"prompt_ids": ex["input_ids"], "completion_ids": [tokenizer.eos_token_id],
                "env_mask": [0]}
    first, last = labelled[0], labelled[-1]
    # Cut after the last model token: what follows is an unanswered output or template text.
    end = min(last + 1, first + cfg.max_completion_length)
    completion = ex["input_ids"][first:end]
    mask = [int(lab != IGNORE_INDEX) for lab in ex["labels"][first:end]]
    return {"prompt_ids": ex["input_ids"][:first], "completion_ids": completion, "env_mask": mask}


def make_rollout_func(rollout: Rollout, cfg: GRPOTrainConfig):
    """Adapt a ``Rollout`` to TRL's ``rollout_func(prompts, trainer) -> dict``."""

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        try:
            trajs = rollout(prompts, model, trainer.processing_class)
        finally:
            model.train(was_training)
        if len(trajs) != len(prompts):
            raise RuntimeError(f"rollout returned {len(trajs)} trajectories for {len(prompts)}")
        rows = [rollout_example(t, trainer.processing_class, cfg) for t in trajs]
        return {
            "prompt_ids": [r["prompt_ids"] for r in rows],
            "completion_ids": [r["completion_ids"] for r in rows],
            "env_mask": [r["env_mask"] for r in rows],
            "logprobs": None,  # recomputed by the trainer from the policy
            "trajectory": trajs,
        }

    return rollout_func


def verifier_reward(completions, reference, trajectory, **_) -> list[float]:
    """r_v: 1.0 if the trajectory's final answer matches the reference, else 0.0."""
    out = []
    for ref, traj in zip(reference, trajectory, strict=True):
        ok = traj.final_answer is not None and grade(traj.final_answer, ref, extract=False)
        out.append(1.0 if ok == Verdict.correct else 0.0)
    return out


def rm_reward(scorer, alpha: float):
    """σ(α · r_m) - 1, the RM term of the shaped reward."""

    def rm_shaping(completions, trajectory, **_) -> list[float]:
        return [1 / (1 + math.exp(-alpha * s)) - 1 for s in scorer.score(list(trajectory))]

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
