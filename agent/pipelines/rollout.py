"""GRPO rollouts through the agent graph: each prompt is solved by the full TIR loop with the
live policy being trained and a sandboxed kernel, reset between rollouts (the kernel is in the
loop). ``training.grpo`` turns the trajectories into masked completions and rewards."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tirforge.trajectories.schema import Trajectory

BackendFactory = Callable[[Any, Any], Any]
"""(live model, tokenizer) -> an agent backend."""


def live_backend(model: Any, tokenizer: Any) -> Any:
    """The agent's transformers backend around the policy being trained (no reload per step)."""
    from tirforge.agent.backends.hf import TransformersBackend

    return TransformersBackend.from_model(model, tokenizer)


def prompt_key(messages: list[dict]) -> str:
    """The lookup key of a prompt (TRL hands rollouts the prompt messages, not the problem)."""
    return json.dumps(messages, sort_keys=True)


def agent_rollout(agent_cfg: Any, executor: Any, problem_of: dict[str, str],
                  backend_factory: BackendFactory | None = None):
    """A GRPO ``Rollout`` (``training.grpo.Rollout``): (prompts, model, tokenizer) -> one
    trajectory per prompt, solved by the agent graph with ``executor`` reset before each.
    ``problem_of`` maps ``prompt_key(prompt)`` to the problem text; ``backend_factory(model,
    tokenizer)`` replaces the live-policy backend (tests script the turns with it)."""
    from tirforge.agent.graph import solve

    def rollout(prompts: list[list[dict]], model: Any, tokenizer: Any) -> list[Trajectory]:
        backend = (backend_factory or live_backend)(model, tokenizer)
        out = []
        for messages in prompts:
            executor.reset()
            out.append(solve(problem_of[prompt_key(messages)], backend, executor, agent_cfg))
        return out

    return rollout


def run_grpo(cfg: Any, problems: str | Path) -> str:
    """``training.grpo.train`` with agent rollouts: the agent of ``cfg`` (``max_turns``,
    ``max_new_tokens``, ``temperature``) on one sandboxed kernel (``executor``, ``sandbox``,
    ``timeout``: the cell timeout), over the problems of ``problems`` (``grpo.load_problems``),
    whose prompts are the agent's own so that TRL's prompt and the rollout's agree. Returns the
    output folder; raises ValueError / OSError for a bad problems file or executor setting."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig
    from tirforge.executors import ExecutorConfig, make_executor
    from tirforge.training import grpo

    agent_cfg = AgentConfig(max_turns=cfg.max_turns, sampling=SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature))
    exec_cfg = ExecutorConfig(backend=cfg.executor, sandbox=cfg.sandbox, timeout=cfg.timeout)
    rows = grpo.load_problems(problems, make_prompt=agent_cfg.fmt.build_messages)
    for r in rows:  # a trajectory file carries its own prompt: use the agent's instead
        r["prompt"] = agent_cfg.fmt.build_messages(r["problem"], hint=agent_cfg.tool_hint)
    problem_of = {prompt_key(r["prompt"]): r["problem"] for r in rows}
    kernel = make_executor(exec_cfg)
    kernel.start()
    with kernel:
        return grpo.train(cfg, agent_rollout(agent_cfg, kernel, problem_of), rows)
