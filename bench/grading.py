"""Grading agreement and throughput against labelled data, vs plain math-verify in the same run.

    .venv/bin/python bench/grading.py [--show N] [--repeat R]

1. Qwen2.5-Math ``math_cot_100.jsonl``: 800 responses with Qwen's grader verdicts (``score``).
2. OpenAI GSM8K ``example_model_solutions.jsonl``: 4 x 1319 solutions with ``is_correct`` labels.
3. MATH500 gold solutions graded against their own ``answer`` field (should all be correct).
4. The fault kinds of issue 17 (``tests/test_grading_kinds.py``): answer pairs and whole
   responses per kind, right / total for tirforge and for math-verify alone.

"math-verify alone" = ``verify(parse(gold), parse(response))`` with math-verify's default
extraction, the usual way to call it. Throughput is responses/s on one core with cold caches.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from math_verify import parse, verify

from tirforge.trajectories import grading, symbolic
from tirforge.trajectories.datasets import data_root

Case = tuple[str, str, bool]  # (response, bare reference, label)


def math_cot_cases(root: Path) -> list[Case]:
    cases = []
    path = root / "qwen25_math_eval/eval_rm_maj_example/math_cot_100.jsonl"
    for line in path.open():
        r = json.loads(line)
        pairs = zip(r["code"], r["score"], strict=True)
        cases += [(resp, r["answer"], bool(s)) for resp, s in pairs]
    return cases


def gsm8k_cases(root: Path) -> list[Case]:
    cases = []
    for line in (root / "gsm8k/example_model_solutions.jsonl").open():
        r = json.loads(line)
        ref = grading.reference_answer(r["ground_truth"])
        for k in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"):
            cases.append((r[k]["solution"], ref, bool(r[k]["is_correct"])))
    return cases


def math500_cases(root: Path) -> list[Case]:
    rows = [json.loads(line) for line in (root / "math500/test.jsonl").open()]
    return [(r["solution"], r["answer"], True) for r in rows]


def ours(response: str, ref: str) -> bool:
    return grading.grade(response, ref) == grading.Verdict.correct


def math_verify_alone(response: str, ref: str) -> bool:
    try:
        return bool(verify(parse("$" + ref + "$"), parse(response)))
    except Exception:
        return False


def run(name: str, cases: list[Case], judge: Callable[[str, str], bool], repeat: int) -> dict:
    best, verdicts = float("inf"), []
    for _ in range(repeat):
        grading.normalize.cache_clear()  # cold caches each pass: fair against math-verify
        symbolic.parse_strict.cache_clear()
        t0 = time.perf_counter()
        verdicts = [judge(resp, ref) for resp, ref, _ in cases]
        best = min(best, time.perf_counter() - t0)
    agree = sum(v == label for v, (_, _, label) in zip(verdicts, cases, strict=True))
    misses = [(i, v) for i, (v, (_, _, label)) in enumerate(zip(verdicts, cases, strict=True))
              if v != label]
    return {"name": name, "n": len(cases), "agree": agree, "rate": len(cases) / best,
            "misses": misses, "correct": sum(verdicts)}


def kind_table() -> None:
    """Right / total per fault kind, tirforge vs math-verify alone (same cases as the tests)."""
    from tirforge.tests import test_grading_kinds as kinds

    rows: list[tuple[str, int, int, int]] = []
    for name, cases in kinds.ALL_KINDS.items():
        ours_ok = sum(grading.answers_equal(p, r) is e for p, r, e, _ in cases)
        mv_ok = sum(math_verify_alone("$" + p + "$", r) is e for p, r, e, _ in cases)
        rows.append((f"answers: {name}", len(cases), ours_ok, mv_ok))
    for name, cases in (("cues", kinds.CUES), ("echoed boxes", kinds.ECHOED_BOXES)):
        ours_ok = sum(grading.extract_answer(t) == e for t, e, _ in cases)
        mv_ok = sum(math_verify_alone(t, e) for t, e, _ in cases)  # extracted value is right
        rows.append((f"extraction: {name}", len(cases), ours_ok, mv_ok))
    several = kinds.SEVERAL_BOXES
    ours_ok = sum(grading.grade(t, r) == v for t, r, v, _ in several)
    mv_ok = sum(math_verify_alone(t, r) is (v == "correct") for t, r, v, _ in several)
    rows.append(("extraction: several boxes vs a set", len(several), ours_ok, mv_ok))
    print(f"\n{'fault kind (issue 17)':40} {'cases':>5} {'tirforge':>9} {'math-verify':>12}")
    for name, n, a, b in rows:
        print(f"{name:40} {n:>5} {a:>9} {b:>12}")
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'all':40} {total[0]:>5} {total[1]:>9} {total[2]:>12}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--show", type=int, default=20, help="disagreements printed per set")
    ap.add_argument("--repeat", type=int, default=3, help="timing passes (best is reported)")
    args = ap.parse_args()
    root = data_root()
    sets = {"math_cot_100 (Qwen score)": math_cot_cases(root),
            "gsm8k example solutions (is_correct)": gsm8k_cases(root)}
    print(f"{'set':40} {'grader':18} {'agree':>12} {'resp/s':>9} {'speed-up':>8}")
    for set_name, cases in sets.items():
        base = run("math-verify alone", cases, math_verify_alone, args.repeat)
        mine = run("tirforge", cases, ours, args.repeat)
        for r in (base, mine):
            print(f"{set_name:40} {r['name']:18} {r['agree']:>5}/{r['n']:<6} {r['rate']:>9.0f} "
                  f"{r['rate'] / base['rate']:>7.2f}x")
        for i, v in mine["misses"][: args.show]:
            resp, ref, label = cases[i]
            pred = grading.extract_answer(resp)
            print(f"  disagreement #{i}: label={label} ours={v} ref={ref!r} pred={pred!r}")
    gold = math500_cases(root)
    r = run("tirforge", gold, ours, 1)
    print(f"MATH500 gold solutions graded correct against `answer`: {r['correct']}/{r['n']} "
          f"({r['correct'] / r['n']:.1%})")
    for i, _ in r["misses"][: args.show]:
        resp, ref, _ = gold[i]
        print(f"  miss #{i}: ref={ref!r} pred={grading.extract_answer(resp)!r}")
    kind_table()


if __name__ == "__main__":
    main()
