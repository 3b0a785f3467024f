"""Query evolution end to end on the replay backend, consensus labels from real kernel runs."""

import pytest

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.graph import AgentConfig
from tirforge.agent.pipelines.evolve import run_evolve, store_collector
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.trajectories.datasets import Problem
from tirforge.trajectories.evolve import (
    EVOLVE_TYPES,
    EvolveConfig,
    build_prompt,
    evolve,
    parse_new_problem,
)
from tirforge.trajectories.store import Store

SEED = Problem("gsm8k/0", "Tom has 3 apples and buys {2} more. How many?", "5")


def test_prompts_live_in_files_and_keep_latex_braces():
    assert {"change_numbers", "fractions_percent", "add_condition", "combine_concepts",
            "reverse", "fuzzify", "dotamath_evolve"} <= set(EVOLVE_TYPES)
    p = build_prompt(SEED, "reverse")
    assert "buys {2} more" in p and "original problem is 5" in p
    with pytest.raises(ValueError, match="unknown evolution type"):
        build_prompt(SEED, "nonsense")


def test_parse_new_problem():
    text = "Sure!\nNew problem: Ann has 4 pens.\nSolution: 4"
    assert parse_new_problem(text) == "Ann has 4 pens."
    assert parse_new_problem("**New Question:** What is 7*8?") == "What is 7*8?"
    assert parse_new_problem("New problem:   ") is None


def test_evolve_provenance_and_drops():
    texts = iter(["New problem: Tom has 7 apples and buys 5 more. How many now?", "", "ok"])
    new, rep = evolve([SEED], lambda ps: [next(texts) for _ in ps],
                      EvolveConfig(types=["change_numbers", "add_condition", "reverse"]))
    assert rep.requested == 3 and rep.produced == 1 and rep.dropped == 2
    (p,) = new
    assert p.id == "gsm8k/0/change_numbers/0" and p.reference is None
    assert p.meta["seed_id"] == "gsm8k/0" and p.meta["type"] == "change_numbers"


def test_evolve_then_label_by_consensus_on_replay(tmp_path):
    rewrites = {  # a phrase of each prompt file -> the "model's" rewrite
        "change the specific numbers": "New problem: Tom has 7 apples, buys 5 more. How many?",
        "reverse the problem": "New problem: Tom buys 2 apples and then has 5. How many before?",
    }

    def generate(prompts):
        return [next(v for k, v in rewrites.items() if k in p) for p in prompts]

    # The agent really runs code: 7+5 always; for the reverse problem the samples disagree.
    add = ["```python\nprint(7 + 5)\n```", "\\boxed{12}"]
    scripts = {f"gsm8k/0/change_numbers/0#{k}": add for k in range(3)}
    scripts |= {f"gsm8k/0/reverse/0#{k}": [f"```python\nprint(5 - {2 + k % 3 // 2})\n```",
                                            f"\\boxed{{{3 - k % 3 // 2}}}"] for k in range(3)}
    with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap", pool_size=1)) as pool:
        problems, stats = run_evolve(
            [SEED], generate,
            store_collector(Store(tmp_path / "s"), ReplayBackend(scripts), pool, AgentConfig()),
            label_samples=3, types=["change_numbers", "reverse"], threshold=0.9,
        )
    by_type = {p.meta["type"]: p for p in problems}
    assert by_type["change_numbers"].reference == "12"
    c = by_type["change_numbers"].meta["consensus"]
    assert c["votes"] == 3 and c["agreement"] == 1.0 and c["accepted"]
    # Samples 0,1 answer 3 and sample 2 answers 2: 2/3 < 0.9, so no label, but the vote is kept.
    rev = by_type["reverse"]
    assert rev.reference is None and rev.meta["consensus"]["answer"] == "3"
    assert rev.meta["consensus"]["votes"] == 2 and not rev.meta["consensus"]["accepted"]
    assert stats["produced"] == 2 and stats["accepted"] == 1


def test_a_rewritten_problem_is_labelled_afresh(tmp_path):
    """A re-run whose rewrite differs reuses the problem id; it must not inherit the old label."""
    scripts = {f"Tom has {n} apples": [f"```python\nprint({n} + 5)\n```", f"\\boxed{{{n + 5}}}"]
               for n in (7, 8)}
    store = Store(tmp_path / "s")
    labels = []
    for n in (7, 8):
        text = f"New problem: Tom has {n} apples, buys 5 more. How many?"
        with KernelPool(ExecutorConfig(backend="local", sandbox="bwrap", pool_size=1)) as pool:
            problems, _ = run_evolve(
                [SEED], lambda ps, text=text: [text for _ in ps],
                store_collector(store, ReplayBackend(scripts), pool, AgentConfig()),
                label_samples=2, types=["change_numbers"],
            )
        (p,) = problems
        assert p.id == "gsm8k/0/change_numbers/0"
        labels.append(p.reference)
    assert labels == ["12", "13"]


def test_evolve_command_rewrites_labels_and_writes_problems(monkeypatch, tmp_path):
    """`tirforge evolve` end to end on the replay backend and real kernels."""
    import json

    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"problem": SEED.problem, "answer": "5"}) + "\n")
    new = "Tom has 7 apples, buys 5 more. How many?"
    backend = ReplayBackend({"You rewrite math word problems": [f"New problem: {new}"],
                             new: ["```python\nprint(7 + 5)\n```", "\\boxed{12}"]})
    monkeypatch.setattr("tirforge.apps.data.make_run_backend", lambda *a, **k: backend)
    out = tmp_path / "evolved.jsonl"
    r = CliRunner().invoke(app, ["evolve", str(seeds), "--out", str(out), "--types",
                                 "change_numbers", "--label-samples", "2", "--concurrency", "1"])
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert (row["problem"], row["answer"], row["type"]) == (new, "12", "change_numbers")
    assert "'accepted': 1" in r.output
