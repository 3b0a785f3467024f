"""GRPO with TRL's ``use_vllm`` (colocate mode) on this CPU: a real ``GRPOTrainer`` builds its
real vLLM engine (``vllm-cpu``), the agent's model calls go to that engine through
``agent.backends.trainer_engine`` (token in, per-token stops), kernels run the code, and the
sampled logprobs reach TRL's importance-sampling correction.

One piece is replaced by a test double: TRL's weight sync into the engine
(``VLLMGeneration.sync_weights``). On vllm-cpu the engine prepacks its linear weights for oneDNN
and drops the parameters TRL's ``load_weights`` writes into, so the sync cannot run on a CPU
engine (it needs the CUDA build). Server mode (``tests/test_vllm_backend.py``, on its ``vllm
serve``) also replaces TRL's NCCL communicator setup (``VLLMClient.init_communicator``, which
refuses a non-CUDA device). ``RecordingWeightSync`` stands in for the sync; each test runs one
step, where the engine and the policy hold the same (initial) weights, so the logprobs the
engine sampled with must equal the trainer's own.

Runs under ``.venv-vllm`` (``make test-vllm``); one engine start (~50 s on this CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or importlib.util.find_spec("trl") is None,
    reason="vLLM is not installed here: `make test-vllm` runs this under .venv-vllm",
)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class RecordingWeightSync:
    """Test double for ``trl``'s ``VLLMGeneration.sync_weights``: records each call (the
    trainer's global step) and pushes nothing, since the CPU engine cannot take the weights."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.trainer = None

    def __call__(self, generation) -> None:
        self.steps.append(self.trainer.state.global_step if self.trainer else -1)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct in float32 (the cached copy is bf16; both sides must agree)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tirforge.agent.models import resolve_model

    src = resolve_model("smollm2")
    out = tmp_path_factory.mktemp("policy") / "smollm2-f32"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def grpo_step(cfg, monkeypatch) -> tuple:
    """One GRPO step (``run_grpo``, the CLI's path) on the agent's prompt for 17 * 23 + 5, with
    the weight sync replaced by ``RecordingWeightSync`` (and, in server mode, TRL's NCCL
    communicator setup by a no-op: both need CUDA). Returns (trainer, the step's trajectories,
    the sync double)."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    from tirforge.agent.pipelines.rollout import run_grpo
    from tirforge.training import grpo, rollout_batch

    sync = RecordingWeightSync()
    monkeypatch.setattr(VLLMGeneration, "sync_weights", lambda self: sync(self))
    monkeypatch.setattr(VLLMClient, "init_communicator", lambda self, device=0: None)
    trainers, batches = [], []
    make_trainer, batch = grpo.make_trainer, rollout_batch.rollout_batch

    def keep_trainer(*a, **kw):
        trainers.append(make_trainer(*a, **kw))
        sync.trainer = trainers[-1]
        return trainers[-1]

    def keep_batch(trajs, *a, **kw):
        batches.append(list(trajs))
        return batch(trajs, *a, **kw)

    monkeypatch.setattr(grpo, "make_trainer", keep_trainer)
    monkeypatch.setattr(rollout_batch, "rollout_batch", keep_batch)
    problems = Path(cfg.output_dir).parent / "problems.jsonl"
    problems.parent.mkdir(parents=True, exist_ok=True)
    problems.write_text(json.dumps({"problem": "What is 17 * 23 + 5?", "answer": "396"}) + "\n")
    t0 = time.perf_counter()
    run_grpo(cfg, problems)
    (trainer,) = trainers
    (trajs,) = batches
    logs = trainer.state.log_history[0]
    print(f"GRPO step ({cfg.vllm_mode}): {time.perf_counter() - t0:.1f} s",
          {k: round(v, 6) for k, v in logs.items() if k.startswith(("sampling/", "tir/"))})
    return trainer, trajs, sync


def step_config(tmp_path, model: str, **kw):
    from tirforge.training.grpo import GRPOTrainConfig

    return GRPOTrainConfig(
        model=model, output_dir=str(tmp_path / "grpo"), max_steps=1, logging_steps=1,
        save_steps=100, report_to=[], num_generations=4, per_device_train_batch_size=4,
        max_completion_length=512, temperature=0.7, max_turns=2, max_new_tokens=96,
        pool_size=4, use_vllm=True, learning_rate=1e-5, **kw)


def assert_faithful_step(trainer, trajs) -> None:
    """Every rollout came from the engine token in (ids + logprobs per turn, prefix property),
    some ran code and went on from its output, and TRL's own log-probabilities of the sampled
    ids equal the engine's (same weights): the rows are the sampled ids at the right
    positions, the logprobs aligned with them, env text masked."""
    from tirforge.trajectories.tokens import prefix_violations

    assert len(trajs) == 4
    tok = trainer.processing_class
    for t in trajs:
        assert t.sampling["token_in"] is True and t.steps
        for s in t.steps:
            assert s.token_ids and len(s.logprobs) == len(s.token_ids)
        assert prefix_violations(t, tok) == []
    assert any(len(t.steps) == 2 and t.steps[0].code for t in trajs), [
        [s.text for s in t.steps] for t in trajs]
    logs = trainer.state.log_history[0]
    assert logs["sampling/sampling_logp_difference/max"] < 2e-3, logs
    assert logs["sampling/sampling_logp_difference/mean"] < 1e-4, logs
    assert abs(logs["sampling/importance_sampling_ratio/mean"] - 1) < 1e-3, logs
    assert logs["tir/text_prompt_rollouts"] == 0


@needs_vllm
def test_grpo_step_samples_from_the_trainers_colocated_engine(policy_dir, tmp_path,
                                                               monkeypatch):
    import trl.generation.vllm_generation as trl_gen

    from tirforge.agent.backends.trainer_engine import trainer_backend
    from tirforge.agent.backends.vllm import VLLMBackend

    # TRL builds its engine with dtype "auto", which vLLM runs as bf16 for a float32 checkpoint
    # on this CPU (max |logp| gap 0.25 against the float32 trainer, measured); pin float32 so
    # that the comparison is exact up to kernel noise.
    monkeypatch.setattr(trl_gen, "LLM", functools.partial(trl_gen.LLM, dtype="float32"))
    trainer, trajs, sync = grpo_step(
        step_config(tmp_path, policy_dir, vllm_mode="colocate", vllm_max_model_length=2048),
        monkeypatch)
    assert sync.steps == [0]  # TRL synced (the double) before the step's rollouts
    backend = trainer_backend(trainer)
    assert isinstance(backend, VLLMBackend) and not backend.owned
    assert backend.llm is trainer.vllm_generation.llm  # the trainer's engine, not a copy
    assert_faithful_step(trainer, trajs)
