"""Stage times of the co-evolving loop's training stages on the default model (CPU).

SmolLM2-135M solves almost nothing on MAWPS at CPU budgets, so a real run skips the RM, SFT and
RL stages for want of correct samples. This script measures those stages on the real model with
graded data that has both verdicts: a replay backend plays scripted TIR solutions (3 of 4
samples right per problem, two distinct code paths) in real sandboxed kernels, and every model
stage is real: RM_r training (listwise) and scoring on SmolLM2, RM-guided selection, SFT of
SmolLM2, GRPO from the SFT model with the RM (its rollouts replayed, the policy's forward,
backward and optimiser step real). Generation time is not measured here (see the loop's CPU run
and ``bench/grpo.py``).

    TIRFORGE_DATA=../shared/data .venv/bin/python bench/loop_coevolve.py --problems 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=6, help="training problems (as many held out)")
    ap.add_argument("--grpo-steps", type=int, default=1)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args()

    from tirforge.agent.backends.replay import ReplayBackend
    from tirforge.agent.pipelines.loop import run_loop
    from tirforge.agent.pipelines.loop_config import LoopConfig

    root = Path(args.out or tempfile.mkdtemp(prefix="loop-coevolve-"))
    root.mkdir(parents=True, exist_ok=True)
    n = 2 * args.problems
    data = root / "toy.jsonl"
    rows = [{"problem": f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many now?",
             "answer": str(3 * i + 4)} for i in range(n)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        a, b = i + 3, 2 * i + 1
        codes = [f"print({a} + {b})", f"x = {a}\ny = {b}\nprint(x + y)"]
        for k in range(8):
            ans = int(row["answer"]) + (k % 4 == 3)
            script[f"toy/{i}#{k}"] = [f"Let me add.\n```python\n{codes[k % 2]}\n```",
                                      f"So the answer is \\boxed{{{ans}}}."]
    cfg = LoopConfig.from_dict({
        "name": "bench", "out_dir": str(root / "runs"), "model": "smollm2",
        "train_dataset": str(data), "train_start": 0, "train_limit": args.problems,
        "eval_dataset": str(data), "eval_start": args.problems, "eval_limit": args.problems,
        "rounds": 1, "samples_per_problem": 4, "concurrency": 8,
        "agent": {"max_turns": 2, "sampling": {"max_new_tokens": 128}},
        "sft": {"num_train_epochs": 1, "max_length": 512, "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2, "report_to": ["none"], "save_steps": 1000},
        "infer": {"n": 2},
        "rm": {"enabled": True, "held_out": 0.34, "select_top_k": 1,
               "train": {"max_length": 512, "per_device_train_batch_size": 1,
                         "num_train_epochs": 1, "report_to": ["none"], "save_steps": 1000}},
        "rl": {"enabled": True, "samples": 4, "min_correct": 2, "max_correct": 3,
               "max_problems": 2, "grpo": {"max_steps": args.grpo_steps,
                                           "max_completion_length": 256,
                                           "report_to": ["none"], "save_steps": 1000}},
    })
    t0 = time.perf_counter()
    run_loop(cfg, lambda model: ReplayBackend(script), log=lambda m: None,
             progress=lambda *a: None, rl_backend=lambda model, tok: ReplayBackend(script))
    wall = time.perf_counter() - t0
    print("| stage | seconds | what |\n|---|---:|---|")
    for rd_name in ("round-0", "round-1", "rl"):
        markers = sorted((cfg.run_dir / rd_name).glob("*.done"), key=lambda p: p.stat().st_mtime)
        for marker in markers:
            print(f"| {rd_name} {marker.stem} | " + describe(marker.stem,
                                                             json.loads(marker.read_text())))
    print(f"\nwall {wall:.0f} s; run folder {cfg.run_dir}")


def describe(stage: str, m: dict) -> str:
    """``seconds | what`` of one stage marker."""
    what = ""
    if stage == "rm":
        what = (f"{m.get('problems')} groups, AUC held-out {m.get('auc_held_out')}, "
                f"train {m.get('train_seconds')} s")
    elif stage == "select":
        what = f"{m['kept']} kept (RFT alone {m['vs_rft']['rft_kept']})"
    elif stage == "train":
        what = f"{m.get('examples', m.get('problems'))} examples/problems"
    return f"{m.get('seconds', 0):.0f} | {what} |"


if __name__ == "__main__":
    main()
