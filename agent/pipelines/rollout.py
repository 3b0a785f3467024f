"""GRPO rollouts through the agent graph, as a library: each prompt is solved by the full TIR loop
with the live policy being trained and a sandboxed kernel in the loop.

Concurrent by default: one step's rollouts go through ``agent.runner.run_many`` over a
``KernelPool`` (one kernel per rollout in flight), their model calls batched across the whole
step. Given one ``Executor`` instead of a pool, rollouts run one at a time on it, reset between
them (the old path, kept as the benchmarks' baseline). ``training.grpo`` turns the trajectories
into token-faithful completions and rewards.

With TRL's ``use_vllm`` (colocate or server) the agent's model calls go to the trainer's own
vLLM engine, whose weights TRL syncs every step (``trainer_policy``,
``agent.backends.trainer_engine``); otherwise to the live model through transformers.

Users call it from their own TRL scripts::

    rollout = agent_rollout(AgentConfig(max_turns=4), pool, problem_of)
    trainer = training.grpo.make_trainer(cfg, rollout, rows)   # or make_rollout_func(rollout, cfg)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tirforge.trajectories.schema import Trajectory

logger = logging.getLogger(__name__)

BackendFactory = Callable[[Any, Any], Any]
"""(live model, tokenizer) -> an agent backend."""
ProblemRow = str | Mapping[str, Any]
"""A problem text, or a mapping with "problem" and optionally "reference" / "problem_id"."""


def live_backend(model: Any, tokenizer: Any) -> Any:
    """The agent backend of the live policy: ``model`` itself when it already is one (the
    trainer's vLLM engine, ``trainer_policy``), else the transformers backend around the model
    being trained (no reload per step)."""
    import torch

    if not isinstance(model, torch.nn.Module) and callable(getattr(model, "generate", None)):
        return model  # an agent Backend
    from tirforge.agent.backends.hf import TransformersBackend

    return TransformersBackend.from_model(model, tokenizer)


def trainer_policy(trainer: Any) -> Any:
    """What a rollout samples from during training: the agent backend over the trainer's vLLM
    engine when TRL's ``use_vllm`` is on (``agent.backends.trainer_engine``: colocate or
    server, weights synced by TRL every step), else the unwrapped policy model (transformers).
    ``training.grpo.make_rollout_func`` calls it through the ``live_policy`` attribute of the
    rollouts ``agent_rollout`` makes."""
    from tirforge.agent.backends.trainer_engine import trainer_backend, uses_vllm

    if uses_vllm(trainer):
        return trainer_backend(trainer)
    return trainer.accelerator.unwrap_model(trainer.model)


def mark_token_in(trajs: list[Trajectory], backend: Any) -> None:
    """Record on each trajectory whether its prompts reached the model as token ids
    (``sampling["token_in"]``): False when the backend re-sent earlier turns as text (an
    OpenAI-compatible server without id prompts), so the trainer's token stream is not what
    the model was conditioned on (``training.rollout_batch`` then drops its logprobs)."""
    token_in = bool(getattr(backend, "token_in", True))
    for t in trajs:
        t.sampling["token_in"] = token_in


def prompt_key(messages: list[dict]) -> str:
    """The lookup key of a prompt (TRL hands rollouts the prompt messages, not the problem)."""
    return json.dumps(messages, sort_keys=True)


def _text(row: ProblemRow) -> str:
    return row if isinstance(row, str) else str(row["problem"])


def failed_rollout(row: ProblemRow, messages: list[dict], error: BaseException) -> Trajectory:
    """The record of a rollout that raised (kernel would not start, pool closed, ...): no steps,
    ``stop_reason="error"``, which ``training.rollout_batch`` treats as an infrastructure fault
    (no reward, no gradient)."""
    ref = None if isinstance(row, str) else row.get("reference")
    return Trajectory(problem=_text(row), reference=None if ref is None else str(ref),
                      messages=messages, stop_reason="error",
                      sampling={"error": f"{type(error).__name__}: {error}"})


def agent_rollout(agent_cfg: Any, kernels: Any, problem_of: Mapping[str, ProblemRow],
                  backend_factory: BackendFactory | None = None, runner_cfg: Any = None):
    """A GRPO ``Rollout`` (``training.grpo.Rollout``): (prompts, model, tokenizer) -> one
    trajectory per prompt, in order. Its ``live_policy`` attribute (``trainer_policy``) makes
    ``training.grpo.make_rollout_func`` hand it the trainer's vLLM engine under ``use_vllm``.

    ``kernels``: a ``KernelPool`` (concurrent: ``run_many``, rollouts in flight = pool size,
    ``runner_cfg`` a ``RunnerConfig`` for batching) or one ``Executor`` (sequential, reset before
    each rollout). ``problem_of`` maps ``prompt_key(prompt)`` to the problem text or a row with
    "problem" and "reference" (then trajectories are graded). ``backend_factory(model,
    tokenizer)`` replaces the live-policy backend (tests script the turns with it). A rollout
    that raises comes back as ``failed_rollout`` (concurrent path) instead of stopping the step.
    Raises KeyError for a prompt that is not in ``problem_of``."""
    from tirforge.executors.pool import KernelPool

    def rows_of(prompts: list[list[dict]]) -> list[ProblemRow]:
        try:
            return [problem_of[prompt_key(m)] for m in prompts]
        except KeyError as e:
            raise KeyError("a prompt is not in problem_of: TRL's prompt and the agent's must "
                           "be built the same way (agent_cfg.fmt.build_messages)") from e

    def concurrent(prompts: list[list[dict]], model: Any, tokenizer: Any) -> list[Trajectory]:
        from tirforge.agent.runner import RunnerConfig, run_many

        backend = (backend_factory or live_backend)(model, tokenizer)
        rows = rows_of(prompts)
        # Each prompt is its own job (TRL already repeats a problem num_generations times).
        jobs = [(r, i) for i, r in enumerate(rows)]
        runner = runner_cfg or RunnerConfig(max_concurrency=kernels.size)
        errors: dict[int, BaseException] = {}

        def on_result(_row: Any, i: int, res: Trajectory | BaseException) -> None:
            if isinstance(res, BaseException):
                errors[i] = res
                logger.warning("rollout %d failed (infrastructure): %r", i, res)

        # Distinct seeds per rollout: with a fixed sampling seed all rollouts would be equal.
        seed = agent_cfg.sampling.seed
        out = run_many([], backend, kernels, agent_cfg, runner, jobs=jobs, on_result=on_result,
                       seed_of=lambda _p, i: None if seed is None else seed + i)
        trajs = [failed_rollout(rows[i], prompts[i], errors[i]) if i in errors else t
                 for i, t in enumerate(out)]  # type: ignore[misc]
        mark_token_in(trajs, backend)
        return trajs

    def sequential(prompts: list[list[dict]], model: Any, tokenizer: Any) -> list[Trajectory]:
        from tirforge.agent.graph import solve

        backend = (backend_factory or live_backend)(model, tokenizer)
        out = []
        for row in rows_of(prompts):
            kernels.reset()
            t = solve(_text(row), backend, kernels, agent_cfg)
            ref = None if isinstance(row, str) else row.get("reference")
            if ref is not None:
                from tirforge.trajectories.grading import grade

                t.reference = str(ref)
                t.verdict = str(grade(t.final_answer, str(ref), extract=False))
            out.append(t)
        mark_token_in(out, backend)
        return out

    rollout = concurrent if isinstance(kernels, KernelPool) else sequential
    rollout.live_policy = trainer_policy  # type: ignore[attr-defined]
    return rollout


def grpo_agent_config(cfg: Any) -> Any:
    """The ``AgentConfig`` of a ``GRPOTrainConfig``: turns, per-turn and per-rollout token caps,
    output truncation, sampling temperature."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig

    return AgentConfig(
        max_turns=cfg.max_turns, max_tokens=cfg.max_rollout_tokens,
        max_output_chars=cfg.max_output_chars,
        # Unseeded: a fixed seed would give every step's rollouts the same random draws.
        sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
    )


def run_grpo(cfg: Any, problems: str | Path) -> str:
    """``training.grpo.train`` with agent rollouts: the agent of ``cfg`` (``grpo_agent_config``)
    on a pool of ``cfg.pool_size`` sandboxed kernels (``executor``, ``sandbox``, ``timeout``: the
    cell timeout; one kernel and sequential rollouts with ``sequential_rollouts``), over the
    problems of ``problems`` (``grpo.load_problems``), whose prompts are the agent's own so that
    TRL's prompt and the rollout's agree. Returns the output folder; raises ValueError / OSError
    for a bad problems file or executor setting."""
    from tirforge.agent.runner import RunnerConfig
    from tirforge.executors import ExecutorConfig, make_executor
    from tirforge.executors.pool import KernelPool
    from tirforge.training import grpo

    agent_cfg = grpo_agent_config(cfg)
    exec_cfg = ExecutorConfig(backend=cfg.executor, sandbox=cfg.sandbox, timeout=cfg.timeout)
    rows = grpo.load_problems(problems, make_prompt=agent_cfg.fmt.build_messages)
    for r in rows:  # a trajectory file carries its own prompt: use the agent's instead
        r["prompt"] = agent_cfg.fmt.build_messages(r["problem"], hint=agent_cfg.tool_hint)
    problem_of = {prompt_key(r["prompt"]): {"problem": r["problem"], "reference": r["reference"]}
                  for r in rows}
    if cfg.sequential_rollouts:
        kernel = make_executor(exec_cfg)
        kernel.start()
        with kernel:
            return grpo.train(cfg, agent_rollout(agent_cfg, kernel, problem_of), rows)
    runner = RunnerConfig(max_concurrency=cfg.pool_size, max_batch=cfg.max_batch)
    # starts every kernel; the factory looked up now (tests replace it)
    with KernelPool(exec_cfg, size=cfg.pool_size, factory=make_executor) as pool:
        return grpo.train(cfg, agent_rollout(agent_cfg, pool, problem_of, runner_cfg=runner),
                          rows)
