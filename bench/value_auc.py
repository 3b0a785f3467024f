"""Step-level value model vs outcome RM: how well each predicts the final verdict from the first
k steps, on a synthetic replay task whose right branch is known.

    .venv/bin/python bench/value_auc.py                      # tiny random Llama, CPU, ~3 min
    .venv/bin/python bench/value_auc.py --model smollm2 --steps 60
    .venv/bin/python bench/value_auc.py --only-full --rollouts 4   # + targets from rollouts

The task: "What is a * b?" solved in three fenced TIR steps. Step 1 picks a method (a product,
right, or a sum, wrong, each in several phrasings) and runs it; step 2 prints the result again;
step 3 boxes an answer: the computed value, or (with probability ``--slip``) one off. So the
verdict is mostly decided at step 1 and settled at step 3: a good partial-trajectory scorer
separates correct from incorrect finishes already at k = 1.

Train: ``--samples`` trajectories for each of ``--train`` problems (the method drawn per sample,
so prefixes are shared and Monte-Carlo targets are fractional); the value model in every loss
ablation and the outcome RM (listwise) on the same file, same model, steps and learning rate.
Test: held-out problems; AUC (Mann-Whitney, ties halved) of each scorer's rating of the first k
steps against the final verdict: the value model reads boundary k of the whole trajectory (the
same tokens as the trajectory cut after k steps), the RM scores the trajectory cut after k steps.

``--rollouts K``: also K fresh rollouts of the task's policy (``SyntheticPolicy``) from every
distinct step prefix of the training set, on real local kernels restored by replay
(``agent.pipelines.value_targets``), and the full value model trained on those targets (mixed
with the logged ones as ``pool``, and ``rollouts`` alone); reports the targets' mean absolute
error against the true P(correct | prefix) and the rollout cost per prefix.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tirforge.agent.formats import get_format  # noqa: E402
from tirforge.executors.result import ExecutionResult  # noqa: E402
from tirforge.trajectories.schema import Step, Trajectory, append_jsonl  # noqa: E402

RIGHT = ["Multiply the two numbers.", "Compute the product.", "Use multiplication here."]
WRONG = ["Add the two numbers.", "Compute the sum.", "Use addition here."]


def synthetic(problems: range, samples: int, p_right: float, slip: float, seed: int):
    rng, fmt, out = random.Random(seed), get_format("qwen-tir"), []
    for p in problems:
        a, b = 3 + p % 7, 4 + (p * 5) % 9
        for s in range(samples):
            right = rng.random() < p_right
            phr = rng.choice(RIGHT if right else WRONG)
            x = a * b if right else a + b
            op = "*" if right else "+"
            code = f"x = {a} {op} {b}\nprint(x)"
            ans = x + (1 if rng.random() < slip else 0)
            steps = [Step(text=f"{phr}\n```python\n{code}\n```", code=code, output=str(x),
                          execution=ExecutionResult(stdout=f"{x}\n")),  # replayable
                     Step(text="Check it.\n```python\nprint('x =', x)\n```",
                          code="print('x =', x)", output=f"x = {x}",
                          execution=ExecutionResult(stdout=f"x = {x}\n")),
                     Step(text=f"The answer is \\boxed{{{ans}}}.")]
            out.append(Trajectory(
                problem=f"What is {a} * {b}?", problem_id=f"syn/{p}", reference=str(a * b),
                messages=fmt.build_messages(f"What is {a} * {b}?"), steps=steps,
                final_answer=str(ans), verdict="correct" if ans == a * b else "incorrect",
                stop_reason="answer", sample=s))
    return out


class SyntheticPolicy:
    """The task's policy as a backend (a replay with known branches): turn 1 draws the method
    (right with ``p_right``), turn 2 checks, turn 3 answers the last output, one off with
    ``slip``. Deterministic per (request seed, sample index, prefix)."""

    name = "synthetic"

    def __init__(self, p_right: float, slip: float):
        self.p_right, self.slip, self.turns = p_right, slip, 0

    def generate(self, requests, params):
        from tirforge.agent.backends.base import Completion

        out = []
        for req in requests:
            a, b = (int(x) for x in re.findall(r"\d+", req.messages[-1]["content"])[:2])
            done = req.prefix.count("```output")
            for i in range(params.n):
                rng = random.Random(f"{req.seed}/{params.seed}/{i}/{req.prefix}")
                self.turns += 1
                if done == 0:
                    right = rng.random() < self.p_right
                    code = f"x = {a} {'*' if right else '+'} {b}\nprint(x)"
                    text = f"{rng.choice(RIGHT if right else WRONG)}\n```python\n{code}\n```"
                elif done == 1:
                    text = "Check it.\n```python\nprint('x =', x)\n```"
                else:
                    x = int(re.findall(r"-?\d+", req.prefix.rsplit("```output", 1)[1])[0])
                    text = f"The answer is \\boxed{{{x + (rng.random() < self.slip)}}}."
                out.append(Completion(text=text, finish_reason="stop", n_tokens=8))
        return out


def search_compare(args, value_path: str, rm_path: str, seed: int) -> list[tuple[str, float,
                                                                                  float]]:
    """(method, accuracy %, model turns per problem) on held-out problems: step search (B=1,
    M=``args.m``) scored by the value model or the RM, and best-of-N by the RM with N = M (so
    about the same number of model turns)."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.graph import AgentConfig, solve
    from tirforge.agent.search import StepSearchConfig, step_search
    from tirforge.agent.strategies import choose
    from tirforge.executors import ExecutorConfig, make_executor
    from tirforge.training.rm import RewardScorer
    from tirforge.training.value import ValueScorer

    problems = synthetic(range(2000, 2000 + args.search), 1, 1.0, 0.0, seed)
    agent = AgentConfig(max_turns=4, sampling=SamplingParams(temperature=0.7, seed=seed))
    value, rm = ValueScorer(value_path, max_length=512), RewardScorer(rm_path, max_length=512)
    kernel = make_executor(ExecutorConfig(backend="local", timeout=10))
    kernel.start()
    rows = []
    try:
        for name, scorer in (("step search, value model", value), ("step search, outcome RM",
                                                                    rm)):
            pol, ok = SyntheticPolicy(args.p_right, args.slip), 0
            for p in problems:
                res = step_search(p.problem, pol, kernel, scorer,
                                  StepSearchConfig(beam_width=1, expansions_per_step=args.m,
                                                   dedupe=False, agent=agent),
                                  reference=p.reference)
                ok += res.best.verdict == "correct"
            rows.append((name, 100 * ok / len(problems), pol.turns / len(problems)))
        pol, ok = SyntheticPolicy(args.p_right, args.slip), 0
        for p in problems:
            trajs = []
            for i in range(args.m):
                kernel.reset()
                cfg = AgentConfig(max_turns=4, sampling=SamplingParams(
                    temperature=0.7, seed=seed * 1000 + i))
                trajs.append(solve(p.problem, pol, kernel, cfg, reference=p.reference))
            ok += choose(trajs, "best-of-n", rm).verdict == "correct"
        rows.append((f"best-of-{args.m}, outcome RM", 100 * ok / len(problems),
                     pol.turns / len(problems)))
    finally:
        kernel.close()
    return rows


def auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tiny_model(root: Path, seed: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tirforge.agent.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / f"tiny{seed}")
    tok.save_pretrained(root / f"tiny{seed}")
    return str(root / f"tiny{seed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (random Llama), an alias or a folder")
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--p-right", type=float, default=0.5)
    ap.add_argument("--slip", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=1, help="repeat with fresh data and init")
    ap.add_argument("--only-full", action="store_true", help="skip the loss ablations")
    ap.add_argument("--search", type=int, default=0,
                    help="also compare step search / best-of-N on this many held-out problems")
    ap.add_argument("--m", type=int, default=4, help="search: continuations per step = N")
    ap.add_argument("--rollouts", type=int, default=0,
                    help="also train on targets from K fresh rollouts per prefix")
    ap.add_argument("--max-prefixes", type=int, default=0,
                    help="rollouts: distinct prefixes per problem at most (0: all)")
    args = ap.parse_args()
    runs = [one_seed(args, seed) for seed in range(args.seeds)]
    n = len(runs)
    print(f"model {args.model}; train {args.train} problems x {args.samples}, test "
          f"{args.test} x {args.samples} per seed; {args.steps} steps at lr {args.lr}; "
          f"{n} seed(s): mean AUC (min-max); correct share of the test sets "
          + ", ".join(f"{r[1]:.2f}" for r in runs) + "\n")
    print("| scorer | AUC k=1 | AUC k=2 | AUC k=3 | train+score s |\n|---|---:|---:|---:|---:|")
    for i, (name, _, _) in enumerate(runs[0][0]):
        cells = []
        for k in range(3):
            xs = [r[0][i][1][k] for r in runs]
            cells.append(f"{sum(xs) / n:.3f}" + (f" ({min(xs):.2f}-{max(xs):.2f})" if n > 1
                                                  else ""))
        secs = sum(r[0][i][2] for r in runs) / n
        print(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
    if args.rollouts:
        print("\nTarget quality on the training set: mean absolute error of the value target "
              "against the true P(correct | first k steps), k = 1, 2\n")
        print("| targets | MAE k=1 | MAE k=2 |\n|---|---:|---:|")
        for name in runs[0][4]["mae"]:
            maes = [[r[4]["mae"][name][k] for r in runs] for k in range(2)]
            print(f"| {name} | " + " | ".join(f"{sum(m) / n:.3f}" for m in maes) + " |")
        for seed, r in enumerate(runs):
            rep = r[4]["report"]
            print(f"\nseed {seed}: {rep.ran} prefixes x K={args.rollouts} rolled out in "
                  f"{rep.seconds:.1f} s = {rep.seconds_per_prefix:.3f} s/prefix "
                  f"({rep.rollouts / rep.seconds:.1f} rollouts/s, {rep.replayed_cells} cells "
                  f"replayed, {rep.forked} prefixes on forks, {len(rep.failed)} failed)")
    if args.search:
        print(f"\n{args.search} held-out problems, p_right {args.p_right}, slip {args.slip}; "
              f"oracle accuracy of one sample {100 * args.p_right * (1 - args.slip):.0f}%\n")
        print("| method | accuracy % | model turns / problem |\n|---|---:|---:|")
        for seed, r in enumerate(runs):
            for name, acc, turns in search_compare(args, r[2], r[3], seed):
                print(f"| {name} (seed {seed}) | {acc:.1f} | {turns:.1f} |")


def rollout_rows(args, common: dict, root: Path, train: list, test: list, labels: list,
                 seed: int) -> tuple[list[tuple[str, list[float], float]], dict]:
    """Rows of the full value model trained on rollout targets (mix pool, rollouts alone), and
    {"mae": targets name -> MAE at k = 1, 2 against the true value, "report": RolloutReport}."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.pipelines.value_targets import RolloutSettings, rollout_targets
    from tirforge.executors import ExecutorConfig
    from tirforge.executors.pool import KernelPool
    from tirforge.training.value import ValueScorer, ValueTrainConfig
    from tirforge.training.value import train as train_value
    from tirforge.training.value_data import mc_targets
    from tirforge.training.value_rollouts import combine_targets

    settings = RolloutSettings(k=args.rollouts, max_turns=3, concurrency=4, seed=seed,
                               sampling=SamplingParams(temperature=0.7), policy="synthetic")
    with KernelPool(ExecutorConfig(backend="local", timeout=10), size=4) as pool:
        records, rep = rollout_targets(train, SyntheticPolicy(args.p_right, args.slip), pool,
                                       settings, str(root / "rollouts.jsonl"),
                                       max_prefixes_per_problem=args.max_prefixes,
                                       selection_seed=seed)
    truth = {t.id: 1.0 - args.slip if t.steps[0].text.split("\n")[0] in RIGHT else 0.0
             for t in train}
    targets = {"logged (shared prefixes)": mc_targets(train)}
    rows = []
    for mix in ("pool", "rollouts"):
        targets[f"rollouts K={args.rollouts}, mix {mix}"] = tg = combine_targets(train, records,
                                                                                mix)
        t0 = time.perf_counter()
        out = train_value(ValueTrainConfig(**common, output_dir=str(root / f"vr-{mix}")), tg)
        vals = ValueScorer(out, max_length=512).step_values(test)
        rows.append((f"value (all terms), rollout targets K={args.rollouts}, mix {mix}",
                     [auc([v[k] for v in vals], labels) for k in range(3)],
                     time.perf_counter() - t0 + rep.seconds))
    mae = {name: [sum(abs(tg[t.id][k] - truth[t.id]) for t in train) / len(train)
                  for k in range(2)] for name, tg in targets.items()}
    return rows, {"mae": mae, "report": rep}


def one_seed(args, seed: int) -> tuple[list[tuple[str, list[float], float]], float, str, str,
                                       dict]:
    """(rows of (scorer, AUC at k = 1..3, seconds), share of correct test trajectories, the
    full value model's folder, the RM's folder, the rollout extras of ``rollout_rows``)."""
    from tirforge.agent.models import resolve_model
    from tirforge.training.rm import RewardScorer, RMTrainConfig
    from tirforge.training.rm import train as train_rm
    from tirforge.training.value import ValueScorer, ValueTrainConfig
    from tirforge.training.value import train as train_value

    root = Path(tempfile.mkdtemp(prefix="value-auc-"))
    model = tiny_model(root, seed) if args.model == "tiny" else str(resolve_model(args.model))
    train = synthetic(range(args.train), args.samples, args.p_right, args.slip, 2 * seed)
    test = synthetic(range(1000, 1000 + args.test), args.samples, args.p_right, args.slip,
                     2 * seed + 1)
    append_jsonl(root / "train.jsonl", train)
    common = dict(model=model, train_file=str(root / "train.jsonl"), max_steps=args.steps,
                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1000,
                  save_steps=10_000, report_to=["none"], max_length=512, seed=seed)
    variants = {
        "value: bce + conservative + contrastive": {},
        "value: bce only": dict(conservative_weight=0.0, contrastive_weight=0.0),
        "value: bce + conservative": dict(contrastive_weight=0.0),
        "value: bce + contrastive": dict(conservative_weight=0.0),
        "value: conservative + contrastive (no MC target)": dict(value_loss="none"),
    }
    if args.only_full:
        variants = dict(list(variants.items())[:1])
    paths: list[str] = []
    labels = [t.verdict == "correct" for t in test]
    rows: list[tuple[str, list[float], float]] = []
    for name, kw in variants.items():
        t0 = time.perf_counter()
        out = train_value(ValueTrainConfig(**common, output_dir=str(root / f"v{len(paths)}"),
                                           **kw))
        paths.append(out)
        vals = ValueScorer(out, max_length=512).step_values(test)
        rows.append((name, [auc([v[k] for v in vals], labels) for k in range(3)],
                     time.perf_counter() - t0))
    extra: dict = {}
    if args.rollouts:
        more, extra = rollout_rows(args, common, root, train, test, labels, seed)
        rows += more
    t0 = time.perf_counter()
    out = train_rm(RMTrainConfig(**common, output_dir=str(root / "rm"), loss="listwise"))
    rm = RewardScorer(out, max_length=512)
    cut = [[t.model_copy(update={"steps": t.steps[: k + 1]}) for t in test] for k in range(3)]
    rows.append(("outcome RM (listwise) on the cut trajectory",
                 [auc(rm.score(c), labels) for c in cut], time.perf_counter() - t0))
    # The best any scorer of the first k steps can do: the true P(correct | prefix).
    p_right = [1.0 - args.slip if t.steps[0].text.split("\n")[0] in RIGHT else 0.0 for t in test]
    exact = [1.0 if t.verdict == "correct" else 0.0 for t in test]
    rows.append(("oracle P(correct | first k steps)", [auc(p_right, labels)] * 2
                 + [auc(exact, labels)], 0.0))
    return rows, sum(labels) / len(labels), paths[0], out, extra

if __name__ == "__main__":
    main()
