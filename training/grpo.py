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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tirforge.training import rollout_batch
from tirforge.training.config import TrainConfig, load_tokenizer
from tirforge.trajectories.grading import Verdict, grade
from tirforge.trajectories.schema import Trajectory
from tirforge.trajectories.tokens import assert_prefix_property

logger = logging.getLogger(__name__)

Rollout = Callable[[list[list[dict]], Any, Any], list[Trajectory]]
"""(prompts as chat messages, live policy, tokenizer) -> one trajectory per prompt. The live
policy is the unwrapped model, or what the rollout's optional ``live_policy(trainer)`` attribute
returns (``agent_rollout``: the trainer's vLLM engine as an agent backend under ``use_vllm``)."""


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
    use_vllm: bool = False
    """Generate the rollouts with TRL's vLLM engine (weights synced from the policy every step;
    needs vLLM, a CUDA GPU for the sync): the agent's model calls go there, token in."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """colocate (an engine inside each training process) or server (``vllm serve`` on other
    GPUs, see README "GRPO at scale")."""
    vllm_server_base_url: str | None = None
    """Server mode: the server's URL (None: ``http://0.0.0.0:8000``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Colocate mode: the share of GPU memory the engine takes (the rest trains)."""
    vllm_max_model_length: int | None = None
    """Colocate mode: the engine's context length (None: the model's)."""
    vllm_enable_sleep_mode: bool = False
    """Colocate mode: free the engine's memory while training (woken for each step's rollouts)."""
    vllm_importance_sampling_correction: bool = True
    """Correct for the engine/trainer mismatch with the sampled tokens' logprobs (TRL's TIS)."""


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
    ``tir/*`` statistics (``rollout_batch.batch_stats``) with TRL's own metrics.

    The rollout's second argument is the live policy: ``rollout.live_policy(trainer)`` when the
    rollout has that attribute (``agent_rollout``'s gives the trainer's vLLM engine under
    ``use_vllm``), else the unwrapped model. Under ``use_vllm`` the engine is woken for the
    rollouts in sleep mode, server-mode ranks wait until the main process has pushed the
    weights, and ``logprobs`` is always a list (None where unknown: TRL's importance-sampling
    ratio is then 1 there)."""
    warned: list[bool] = []

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        vllm = getattr(trainer, "use_vllm", False)
        live_policy = getattr(rollout, "live_policy", None)
        if vllm and live_policy is None and not warned:
            warned.append(True)
            logger.warning("use_vllm is on but the rollout samples from the model it is given "
                           "(no live_policy): the vLLM engine is not used for rollouts")
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with _engine_awake(trainer):
                policy = live_policy(trainer) if live_policy is not None else model
                trajs = rollout(prompts, policy, trainer.processing_class)
        finally:
            model.train(was_training)
        if len(trajs) != len(prompts):
            raise RuntimeError(f"rollout returned {len(trajs)} trajectories for {len(prompts)}")
        out, stats = rollout_batch.rollout_batch(
            trajs, trainer.processing_class, cfg.max_completion_length, cfg.style,
            cfg.filter_void_turns)
        if vllm and out["logprobs"] is None:  # TRL subtracts them: NaN (ratio 1), not None
            out["logprobs"] = [[None] * len(c) for c in out["completion_ids"]]
        stats["tir/rollout_s"] = time.perf_counter() - t0
        if cfg.check_prefix_property:
            for t in trajs:
                assert_prefix_property(t, trainer.processing_class)
        _log(trainer, stats, "train" if was_training else "eval")
        return out

    return rollout_func


@contextmanager
def _engine_awake(trainer):
    """TRL's vLLM engine ready for a ``rollout_func``'s requests: TRL has synced the weights
    (``_generate`` does it before calling us); in server mode every rank waits for the main
    process to finish pushing them, and in colocate sleep mode the engine's weights and KV
    cache are woken and put back to sleep afterwards, as TRL's own ``generate`` does."""
    gen = getattr(trainer, "vllm_generation", None)
    if not getattr(trainer, "use_vllm", False) or gen is None:
        yield
        return
    if gen.mode == "server":
        trainer.accelerator.wait_for_everyone()
    sleeping = gen.mode == "colocate" and gen.enable_sleep_mode
    if sleeping:
        if gen._llm_weights_sleeping:
            gen.sync_weights()
        gen.llm.wake_up(tags=["kv_cache"])
    try:
        yield
    finally:
        if sleeping:
            gen.llm.sleep(level=2)
            gen._llm_weights_sleeping = True


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


def vllm_kwargs(cfg: GRPOTrainConfig) -> dict[str, Any]:
    """The ``GRPOConfig`` fields of TRL's vLLM generation (none without ``use_vllm``)."""
    if not cfg.use_vllm:
        return {}
    if cfg.vllm_mode not in ("colocate", "server"):
        raise ValueError(f"vllm_mode must be colocate or server, not {cfg.vllm_mode!r}")
    names = ("vllm_mode vllm_server_base_url vllm_gpu_memory_utilization vllm_max_model_length "
             "vllm_enable_sleep_mode vllm_importance_sampling_correction").split()
    return {"use_vllm": True, **{n: getattr(cfg, n) for n in names}}


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
        **vllm_kwargs(cfg),
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
