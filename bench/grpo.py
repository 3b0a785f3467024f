"""GRPO rollouts and steps: concurrent (``run_many`` over a ``KernelPool``) vs the old sequential
rollout (one trajectory at a time on one kernel), same model, problems and settings, one run.

    .venv/bin/python bench/grpo.py [--model smollm2] [--problems 2] [--group 4] [--turns 2]
                                   [--new-tokens 64] [--steps 1]

1. Rollout: the step's prompts (``problems`` x ``group``) through ``agent_rollout`` with the
   live-policy transformers backend; trajectories per minute and the token-stream tokenisation
   cost (``rollout_batch``) per step.
2. GRPO step: ``--steps`` TRL steps with each rollout (``make_trainer``); seconds per step, and
   the share of it spent in the rollout (generation + kernels) and in tokenisation.

Prints a markdown table with the concurrent / sequential ratio. CPU figures vary with the load
of the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from tirforge.agent.models import resolve_model  # noqa: E402
from tirforge.agent.pipelines.rollout import (  # noqa: E402
    agent_rollout,
    grpo_agent_config,
    prompt_key,
)
from tirforge.agent.runner import RunnerConfig  # noqa: E402
from tirforge.executors import ExecutorConfig, make_executor  # noqa: E402
from tirforge.executors.pool import KernelPool  # noqa: E402
from tirforge.training.grpo import GRPOTrainConfig, make_trainer  # noqa: E402
from tirforge.training.rollout_batch import rollout_batch  # noqa: E402

PROBLEMS = [
    ("What is 17 * 23?", "391"),
    ("What is the sum of the integers from 1 to 50?", "1275"),
    ("What is 2 to the power 12?", "4096"),
    ("What is 1001 - 457?", "544"),
]


class Timed:
    """Wraps a Rollout: records seconds in the rollout and in tokenisation per call."""

    def __init__(self, rollout, cfg):
        self.rollout, self.cfg = rollout, cfg
        self.rollout_s: list[float] = []
        self.tok_s: list[float] = []
        self.n: list[int] = []

    def __call__(self, prompts, model, tok):
        t0 = time.perf_counter()
        out = self.rollout(prompts, model, tok)
        self.rollout_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rollout_batch(out, tok, self.cfg.max_completion_length)  # what the trainer does again
        self.tok_s.append(time.perf_counter() - t0)
        self.n.append(len(out))
        return out


def run(mode: str, args, rows, problem_of, cfg: GRPOTrainConfig) -> dict[str, float]:
    agent_cfg = grpo_agent_config(cfg)
    exec_cfg = ExecutorConfig(backend="local", sandbox="auto", timeout=10.0)
    if mode == "concurrent":
        kernels = KernelPool(exec_cfg, size=cfg.pool_size).start()
        rollout = agent_rollout(agent_cfg, kernels, problem_of,
                                runner_cfg=RunnerConfig(max_concurrency=cfg.pool_size))
    else:
        kernels = make_executor(exec_cfg)
        kernels.start()
        rollout = agent_rollout(agent_cfg, kernels, problem_of)
    timed = Timed(rollout, cfg)
    try:
        trainer = make_trainer(cfg, timed, rows)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    finally:
        kernels.close()
    steps = max(1, len(timed.rollout_s))
    return {
        "traj_per_min": 60 * sum(timed.n) / sum(timed.rollout_s),
        "s_per_step": total / steps,
        "rollout_share": sum(timed.rollout_s) / total,
        "tok_ms_per_step": 1000 * sum(timed.tok_s) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    model = str(resolve_model(args.model))
    agent_cfg = grpo_agent_config(GRPOTrainConfig(max_turns=args.turns,
                                                  max_new_tokens=args.new_tokens))
    rows = []
    for problem, ref in PROBLEMS[: args.problems]:
        prompt = agent_cfg.fmt.build_messages(problem, hint=agent_cfg.tool_hint)
        rows.append({"prompt": prompt, "problem": problem, "reference": ref})
    problem_of = {prompt_key(r["prompt"]): {"problem": r["problem"], "reference": r["reference"]}
                  for r in rows}
    results = {}
    for mode in ("sequential", "concurrent"):
        with tempfile.TemporaryDirectory() as out:
            cfg = GRPOTrainConfig(
                model=model, output_dir=out, num_generations=args.group,
                per_device_train_batch_size=args.group * args.problems,
                max_completion_length=args.turns * (args.new_tokens + 200),
                max_turns=args.turns, max_new_tokens=args.new_tokens, temperature=0.8,
                max_steps=args.steps, save_steps=10_000, logging_steps=1, report_to=["none"],
                pool_size=args.group * args.problems,
            )
            results[mode] = run(mode, args, rows, problem_of, cfg)
        print(mode, results[mode], flush=True)
    seq, con = results["sequential"], results["concurrent"]
    print(f"\n{args.problems} problems x group {args.group}, {args.turns} turns x "
          f"{args.new_tokens} new tokens, {args.steps} step(s), {model.rsplit('/', 1)[-1]}\n")
    print("| | sequential | concurrent | ratio |\n|---|---|---|---|")
    print(f"| rollout trajectories/min | {seq['traj_per_min']:.1f} | {con['traj_per_min']:.1f} "
          f"| {con['traj_per_min'] / seq['traj_per_min']:.2f}x |")
    print(f"| s / GRPO step | {seq['s_per_step']:.1f} | {con['s_per_step']:.1f} "
          f"| {seq['s_per_step'] / con['s_per_step']:.2f}x |")
    print(f"| rollout share of the step | {seq['rollout_share']:.0%} | "
          f"{con['rollout_share']:.0%} | |")
    print(f"| token-stream tokenisation, ms / step | {seq['tok_ms_per_step']:.0f} | "
          f"{con['tok_ms_per_step']:.0f} | |")


if __name__ == "__main__":
    main()
