"""Training benchmarks: masking throughput, and SFT tokens/s with our masking vs plain TRL SFT.

    .venv/bin/python bench/training.py [--n 400] [--steps 8] [--model smollm2]
    .venv/bin/python bench/training.py --gsm8k-graded OUT.jsonl [--store runs/gsm8k-smol]

1. Tokenisation + masking: synthetic multi-turn TIR trajectories (2-4 code steps with outputs)
   through ``tokenize_trajectory``, trajectories/s, for both layouts, with the SmolLM2 tokenizer.
2. SFT tokens/s: the same trajectories, the same model and settings, trained for ``--steps``
   steps (a) on our pre-tokenised masked examples, (b) by plain TRL SFT on the ``messages``
   (fenced) column, which tokenises itself and trains on every token. Tokens/s counts all
   input tokens of the steps run (padding excluded), after one warm-up step.

``--gsm8k-graded`` instead writes the data of the SmolLM2 ``tirforge train`` runs in
docs/benchmarks.md: the graded trajectories of a ``tirforge collect gsm8k`` store plus, for each of
its problems, two trajectories written from the GSM8K reference solution (its ``<<a*b=c>>``
calculator steps as one Python cell, run here, then a boxed answer, graded like any sample), so
that problems have correct and incorrect samples even when the model solves none; and
``OUT-problems.jsonl`` with 8 of the problems for GRPO.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tirforge.agent.models import resolve_model  # noqa: E402
from tirforge.training.masking import tokenize_trajectory  # noqa: E402
from tirforge.trajectories.messages import to_messages  # noqa: E402
from tirforge.trajectories.schema import Step, Trajectory  # noqa: E402


def synthetic(n: int, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    words = "let us compute the value of x then check it with python and sum".split()
    out = []
    for i in range(n):
        steps = []
        for _ in range(rng.randint(2, 4)):
            prose = " ".join(rng.choices(words, k=rng.randint(10, 40)))
            code = "\n".join(f"x{j} = {rng.randint(1, 99)} * {j + 3}" for j in range(4))
            steps.append(Step(text=f"{prose}\n```python\n{code}\nprint(x0)\n```", code=code,
                              output=str(rng.randint(1, 9999)) * rng.randint(1, 20)))
        steps.append(Step(text=f"So the answer is \\boxed{{{i}}}."))
        out.append(Trajectory(problem=f"p{i}", messages=[
            {"role": "system", "content": "Integrate reasoning and programs."},
            {"role": "user", "content": f"Problem {i}: compute something."}], steps=steps,
            verdict="correct"))
    return out


def bench_masking(tok, trajs) -> None:
    for style in ("fenced", "tool"):
        tokenize_trajectory(trajs[0], tok, style)
        t0 = time.perf_counter()
        n_tok = sum(len(tokenize_trajectory(t, tok, style)["input_ids"]) for t in trajs)
        dt = time.perf_counter() - t0
        print(f"masking {style:6s}: {len(trajs) / dt:8.1f} trajectories/s "
              f"({n_tok / dt / 1e3:.0f}k tokens/s, {n_tok / len(trajs):.0f} tokens each)")


class _Clock:
    """TrainerCallback: wall time and input tokens of the steps after the first."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 1:
                    clock.t0, clock.tok0 = time.perf_counter(), state.num_input_tokens_seen

            def on_train_end(self, args, state, control, **kw):
                clock.dt = time.perf_counter() - clock.t0
                clock.tokens = state.num_input_tokens_seen - clock.tok0

        self.callback = CB()


def bench_sft(model: str, trajs, steps: int) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tirforge.training.sft import SFTTrainConfig, make_trainer

    tok = AutoTokenizer.from_pretrained(model)
    common = dict(max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-5,
                  logging_steps=1000, save_steps=10_000, report_to=["none"],
                  gradient_checkpointing=False, bf16=False, seed=0)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.jsonl")
        with open(path, "w") as f:
            f.writelines(t.model_dump_json() + "\n" for t in trajs)
        cfg = SFTTrainConfig(model=model, train_file=path, output_dir=os.path.join(d, "ours"),
                             max_length=1024, **common)
        ours = make_trainer(cfg)
        plain = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=os.path.join(d, "plain"), max_length=1024, packing=False,
                           **common),
            train_dataset=Dataset.from_list([{"messages": to_messages(t, "fenced")}
                                             for t in trajs]),
            processing_class=tok,
        )
        for name, trainer in (("tirforge masked", ours), ("plain TRL", plain)):
            trainer.args.include_num_input_tokens_seen = "non_padding"
            clock = _Clock()
            trainer.add_callback(clock.callback)
            trainer.train()
            results[name] = clock.tokens / clock.dt
            print(f"SFT {name:16s}: {results[name]:8.0f} tokens/s over {steps - 1} steps")
    print(f"ratio masked / plain: {results['tirforge masked'] / results['plain TRL']:.3f}")


def _reference_steps(solution: str, variant: int) -> tuple[list[Step], str]:
    """A TIR solution from a GSM8K reference: its calculator steps as one cell, run here."""
    calcs = re.findall(r"<<([^=<>]+)=([^<>]+)>>", solution)
    code = "\n".join(f"v{k} = {expr.replace('x', '*')}" for k, (expr, _) in enumerate(calcs))
    code += f"\nprint(v{len(calcs) - 1})"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # our own arithmetic from the dataset, not model code
    out = buf.getvalue().rstrip("\n")
    try:
        ans = str(int(float(out))) if float(out) == int(float(out)) else out
    except ValueError:
        ans = out
    if variant == 0:
        first = f"Let me compute this step by step in Python.\n```python\n{code}\n```"
        last = f"The code prints {out}, so the answer is $\\boxed{{{ans}}}$."
    else:
        lead = solution.splitlines()[0].split("=")[0].strip()
        first = f"{lead}. I will check it with code.\n```python\n{code}\n```"
        last = f"So the final answer is \\boxed{{{ans}}}."
    return [Step(text=first, code=code, output=out), Step(text=last)], ans


def gsm8k_graded(store: str, out: str) -> None:
    """Write the store's trajectories + two reference-solution trajectories per problem."""
    from collections import Counter

    from tirforge.trajectories.datasets import data_root
    from tirforge.trajectories.grading import grade
    from tirforge.trajectories.store import Store

    real = Store(store).read()  # each key once, even in a store an older version wrote twice
    if not real:
        raise SystemExit(f"no trajectories in {store} (tirforge collect gsm8k --out {store} ...)")
    rows = [json.loads(ln) for ln in open(data_root() / "gsm8k" / "test.jsonl")]
    first: dict[str, Trajectory] = {}
    for t in real:
        first.setdefault(t.problem_id or t.problem, t)
    made = []
    for pid, proto in sorted(first.items(), key=lambda kv: int(kv[0].rsplit("/", 1)[1])):
        solution = rows[int(pid.rsplit("/", 1)[1])]["answer"]
        for variant in (0, 1):
            steps, ans = _reference_steps(solution, variant)
            verdict = grade(ans, proto.reference, extract=False)
            made.append(Trajectory(
                problem=proto.problem, problem_id=pid, reference=proto.reference,
                sample=100 + variant, messages=proto.messages, steps=steps, final_answer=ans,
                verdict=str(getattr(verdict, "value", verdict)), stop_reason="answer",
                model="gsm8k-reference", format=proto.format))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.writelines(t.model_dump_json() + "\n" for t in real + made)
    problems = sorted(({"problem": t.problem, "reference": t.reference} for t in first.values()),
                      key=lambda r: r["problem"])[:8]
    with open(out.removesuffix(".jsonl") + "-problems.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in problems)
    print(out, len(real + made), dict(Counter(t.verdict for t in real + made)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gsm8k-graded", metavar="OUT", help="write the train-run data and exit")
    ap.add_argument("--store", default="runs/gsm8k-smol", help="collect store (--gsm8k-graded)")
    a = ap.parse_args()
    if a.gsm8k_graded:
        gsm8k_graded(a.store, a.gsm8k_graded)
        return
    from transformers import AutoTokenizer

    model = resolve_model(a.model)
    trajs = synthetic(a.n)
    bench_masking(AutoTokenizer.from_pretrained(model), trajs)
    bench_sft(model, trajs[:64], a.steps)


if __name__ == "__main__":
    main()
