"""``make_rollout_func`` under TRL's ``use_vllm``, without vLLM: which policy the rollout gets,
and the ``logprobs`` TRL's importance-sampling correction needs. The trainer is a stand-in
(``SimpleNamespace`` with the attributes TRL's ``GRPOTrainer`` has); the end-to-end runs with
a real engine are tests/test_grpo_vllm.py and tests/test_vllm_backend.py (under .venv-vllm)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tirforge.training.grpo import GRPOTrainConfig, make_rollout_func, vllm_kwargs
from tirforge.trajectories.schema import Step, Trajectory

from .training_utils import tokenizer

PROMPT = [{"role": "user", "content": "2+3?"}]


def stand_in_trainer(use_vllm: bool, mode: str = "colocate"):
    """Test double for TRL's GRPOTrainer: the attributes ``make_rollout_func`` reads."""
    model = torch.nn.Linear(2, 2)
    waits = []
    return SimpleNamespace(
        use_vllm=use_vllm, model=model, processing_class=tokenizer(),
        vllm_generation=SimpleNamespace(mode=mode, enable_sleep_mode=False),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m,
                                    wait_for_everyone=lambda: waits.append(1)),
        waits=waits,
    )


def text_only_rollout(seen: list):
    def rollout(prompts, policy, tok):
        seen.append(policy)
        return [Trajectory(problem="p", messages=p, steps=[Step(text="\\boxed{5}")])
                for p in prompts]
    return rollout


def test_use_vllm_hands_the_rollout_its_live_policy_and_logprobs_are_lists():
    seen: list = []
    rollout = text_only_rollout(seen)
    engine = object()  # what live_policy returns (the trainer's engine backend in real runs)
    rollout.live_policy = lambda trainer: engine
    trainer = stand_in_trainer(use_vllm=True, mode="server")
    out = make_rollout_func(rollout, GRPOTrainConfig())([PROMPT, PROMPT], trainer)
    assert seen == [engine]
    assert trainer.waits == [1]  # server mode: ranks wait for the weight push
    # No sampled logprobs anywhere: TRL still gets a list per row (None -> NaN -> ratio 1).
    assert out["logprobs"] == [[None] * len(c) for c in out["completion_ids"]]


def test_without_vllm_the_rollout_gets_the_model_and_logprobs_stay_none():
    seen: list = []
    trainer = stand_in_trainer(use_vllm=False)
    out = make_rollout_func(text_only_rollout(seen), GRPOTrainConfig())([PROMPT], trainer)
    assert seen == [trainer.model] and out["logprobs"] is None
    assert trainer.waits == []


def test_vllm_config_keys():
    assert vllm_kwargs(GRPOTrainConfig()) == {}
    kw = vllm_kwargs(GRPOTrainConfig(use_vllm=True, vllm_mode="server",
                                     vllm_server_base_url="http://h:8000"))
    assert kw["use_vllm"] and kw["vllm_mode"] == "server"
    assert kw["vllm_server_base_url"] == "http://h:8000"
    with pytest.raises(ValueError, match="vllm_mode must be one of colocate, server"):
        vllm_kwargs(GRPOTrainConfig(use_vllm=True, vllm_mode="remote"))  # type: ignore[arg-type]


def test_trainer_backend_refuses_a_trainer_without_vllm_and_colocated_tp():
    from tirforge.agent.backends.trainer_engine import server_url, trainer_backend

    with pytest.raises(ValueError, match="use_vllm=False"):
        trainer_backend(stand_in_trainer(use_vllm=False))
    tp = stand_in_trainer(use_vllm=True)
    tp.vllm_generation.tensor_parallel_size = 2
    with pytest.raises(NotImplementedError, match="server"):
        trainer_backend(tp)
    gen = SimpleNamespace(server_base_url=None, server_host="10.0.0.2", server_port=8001)
    assert server_url(gen) == "http://10.0.0.2:8001/v1"
    gen.server_base_url = "http://vllm:8000/"
    assert server_url(gen) == "http://vllm:8000/v1"
