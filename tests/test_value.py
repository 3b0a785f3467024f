"""Step-level value model: Monte-Carlo targets, step boundaries in every format, each loss term's
direction, and a trained value model steering step search on a real kernel."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tirforge.agent.formats import FORMATS, get_format
from tirforge.training.value import (
    BoundaryCollator,
    ValueScorer,
    ValueTrainConfig,
    boundary_values,
    problem_examples,
    value_loss_terms,
)
from tirforge.training.value_data import (
    encode_steps,
    first_divergence,
    mc_targets,
    perturb,
    unsupported_step,
)
from tirforge.trajectories.schema import Step, Trajectory, append_jsonl
from tirforge.trajectories.transcript import render_prefix

from .test_formats import transcript
from .training_utils import tiny_model_dir, tokenizer

CONFIGS = Path(__file__).parents[1] / "configs"
A, B, C, D, E, F = (Step(text=f"step {x} with 1{x}.") for x in "ABCDEF")


def traj(pid: str, steps: list[Step], verdict: str | None, fmt: str = "qwen-tir") -> Trajectory:
    f = get_format(fmt)
    return Trajectory(problem=f"problem {pid}", problem_id=pid, steps=steps, verdict=verdict,
                      messages=f.build_messages(f"problem {pid}: what is 6 * 7?"), format=fmt)


def test_mc_targets_share_exact_prefixes_within_a_problem():
    a_other_output = Step(text=A.text, output="different output")
    t1 = traj("p", [A, B, C], "correct")
    t2 = traj("p", [A, B, D], "incorrect")
    t3 = traj("p", [A, E], "correct")
    t4 = traj("p", [F], "incorrect")
    t5 = traj("p", [a_other_output, B], "correct")  # same text, other output: another state
    t6 = traj("q", [A, B], "incorrect")  # same steps, another problem: never mixed in
    t7 = traj("p", [A, B, C], None)  # ungraded: neither counted nor given targets
    got = mc_targets([t1, t2, t3, t4, t5, t6, t7])
    assert got[t1.id] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert got[t2.id] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert got[t3.id] == pytest.approx([2 / 3, 1.0])
    assert got[t4.id] == [0.0] and got[t5.id] == [1.0, 1.0] and got[t6.id] == [0.0, 0.0]
    assert t7.id not in got
    assert first_divergence(t1, t2) == 2 and first_divergence(t1, t3) == 1
    assert first_divergence(t1, t1) is None and first_divergence(t1, t5) == 0
    with pytest.raises(ValueError, match="unique"):
        mc_targets([t1, t1])


@pytest.mark.parametrize("template", ["smollm", "qwen"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_boundaries_end_each_step_in_every_format(fmt, template):
    tok = tokenizer(template)
    t = traj("p", transcript(fmt), "correct", fmt)
    enc = encode_steps(t, tok)
    assert len(enc.bounds) == len(t.steps) and enc.cut == 0
    assert enc.bounds == sorted(enc.bounds) and len(set(enc.bounds)) == len(enc.bounds)
    for k, b in enumerate(enc.bounds):
        so_far = render_prefix(t.steps[: k + 1])
        assert tok.decode(enc.input_ids[: b + 1]).endswith(so_far)  # the step's last token...
        assert not tok.decode(enc.input_ids[:b]).endswith(so_far)  # ...and not one later
        # The trajectory cut after step k reads the same tokens up to its last boundary.
        part = encode_steps(t.model_copy(update={"steps": t.steps[: k + 1]}), tok)
        assert part.input_ids[: part.bounds[-1] + 1] == enc.input_ids[: b + 1]


def test_truncation_keeps_head_and_last_boundary():
    tok = tokenizer()
    steps = [Step(text=f"Line {i}: " + "word " * 30) for i in range(12)]
    t = traj("p", steps, "correct")
    full = encode_steps(t, tok)
    enc = encode_steps(t, tok, max_length=200)
    assert enc.cut > 0 and len(enc.input_ids) <= 200
    assert enc.bounds[0] is None and enc.bounds[-1] is not None  # middle gone, end kept
    kept = [k for k, b in enumerate(enc.bounds) if b is not None]
    assert kept == list(range(kept[0], len(steps)))
    for k in kept:  # each kept boundary still points at the same token as before the cut
        assert enc.input_ids[enc.bounds[k]] == full.input_ids[full.bounds[k]]
        assert enc.input_ids[-(len(full.input_ids) - full.bounds[k]):][0] == \
            full.input_ids[full.bounds[k]]


def test_unsupported_steps_are_off_the_data():
    rng = random.Random(0)
    s = Step(text="x = 12 + 3", code="x = 12 + 3", output="15")
    p = perturb(s, rng)
    assert p is not None and p.text != s.text and p.output != "15"
    assert perturb(Step(text="no digits"), rng) is None
    t = traj("p", [s], "correct")
    other = traj("q", [F], "correct")
    seen = {(s.text, s.output, s.feedback)}
    assert unsupported_step(t, 0, [other], seen, "other-problem", rng).text == F.text
    assert unsupported_step(t, 0, [], seen, "perturbed", rng).text != s.text
    # A candidate the data did take is never offered as unsupported.
    assert unsupported_step(t, 0, [other], seen | {(F.text, None, None)}, "other-problem",
                            rng) is None


def _data():
    """Problem p: a shared first step, then a good and a bad branch; problem q: one success."""
    good = [A, B, Step(text="So \\boxed{42}.")]
    bad = [A, C, Step(text="So \\boxed{13}.")]
    return [traj("p", good, "correct"), traj("p", bad, "incorrect"),
            traj("p", [A, C, Step(text="So \\boxed{42}.")], "correct"),
            traj("q", [D, Step(text="So \\boxed{1}.")], "correct")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tirforge.training.rm import load_rm

    path = tiny_model_dir(tmp_path_factory.mktemp("value"))
    tok = tokenizer()
    torch.manual_seed(0)
    return path, tok, load_rm(path, tok)


def _batch(tok, **kw):
    cfg = ValueTrainConfig(model="x", train_file="x", **kw)
    ex = problem_examples(_data(), tok, cfg)
    return cfg, BoundaryCollator(tok.pad_token_id)(ex)


def test_examples_hold_targets_pairs_and_unsupported_rows(tiny):
    _, tok, _ = tiny
    cfg, batch = _batch(tok)
    # 4 logged trajectories + one unsupported continuation each (3 for p, 1 for q).
    assert batch["input_ids"].shape[0] == 8
    tgt, row = batch["b_target"], batch["b_row"]
    # Rows: p's 3 samples then their 3 unsupported continuations, q's sample then its one.
    logged_rows = torch.isin(row, torch.tensor([0, 1, 2, 6]))
    assert (torch.isnan(tgt) == ~logged_rows).all()  # unsupported rows carry no target
    assert len(batch["cons_unsup"]) == 4
    logged = sorted(tgt[logged_rows].tolist())
    assert logged == pytest.approx(sorted([2 / 3, 1.0, 1.0, 2 / 3, 0.5, 0.0, 2 / 3, 0.5, 1.0,
                                           1.0, 1.0]))
    # Correct vs incorrect samples of p: (A,B) vs (A,C) diverge at step 2 (values 1 vs 1/2),
    # (A,C,42) vs (A,C,13) at step 3 (1 vs 0); q has no incorrect sample.
    pairs = sorted(zip(tgt[batch["pair_pos"]].tolist(), tgt[batch["pair_neg"]].tolist(),
                       strict=True))
    assert pairs == [(1.0, 0.0), (1.0, 0.5)]
    for k in ("cons_data", "pair_pos", "pair_neg"):
        assert logged_rows[batch[k]].all()
    assert not logged_rows[batch["cons_unsup"]].any()


def _step(model, batch, cfg, lr=0.05):
    """Values (N,) before and after one SGD step on ``cfg``'s loss terms."""
    model = __import__("copy").deepcopy(model)
    args = [batch[k] for k in ("input_ids", "attention_mask", "b_row", "b_pos")]
    before = boundary_values(model, *args)
    terms = value_loss_terms(before, batch, cfg)
    sum(terms.values()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
        after = boundary_values(model, *args)
    return before.detach(), after, terms


@pytest.mark.parametrize("only", ["value", "conservative", "contrastive"])
def test_each_loss_term_moves_values_as_intended(tiny, only):
    _, tok, model = tiny
    cfg, batch = _batch(tok, value_loss="bce" if only == "value" else "none",
                        conservative_weight=1.0 if only == "conservative" else 0.0,
                        contrastive_weight=1.0 if only == "contrastive" else 0.0)
    before, after, terms = _step(model, batch, cfg)
    assert set(terms) == {only}
    if only == "value":
        has = ~torch.isnan(batch["b_target"])
        t = batch["b_target"][has]
        err = lambda v: (torch.sigmoid(v[has]) - t).abs().mean()  # noqa: E731
        assert err(after) < err(before)
    elif only == "conservative":
        gap = lambda v: (v[batch["cons_unsup"]] - v[batch["cons_data"]]).mean()  # noqa: E731
        assert gap(after) < gap(before)
    else:
        gap = lambda v: (v[batch["pair_pos"]] - v[batch["pair_neg"]]).mean()  # noqa: E731
        assert gap(after) > gap(before)


def test_loss_gradients_point_the_right_way(tiny):
    _, tok, _ = tiny
    cfg, batch = _batch(tok, value_loss="mse")
    values = torch.zeros(len(batch["b_target"]), requires_grad=True)
    terms = value_loss_terms(values, batch, cfg)
    assert set(terms) == {"value", "conservative", "contrastive"}
    g = {k: torch.autograd.grad(v, values, retain_graph=True)[0] for k, v in terms.items()}
    # Descent lowers unsupported values and raises the supported ones beside them.
    assert (g["conservative"][batch["cons_unsup"]] > 0).all()
    assert (g["conservative"][batch["cons_data"]] < 0).all()
    assert (g["contrastive"][batch["pair_pos"]] < 0).all()
    assert (g["contrastive"][batch["pair_neg"]] > 0).all()
    # The value term pulls each boundary towards its target (σ(0) = 0.5).
    tgt = batch["b_target"]
    assert (g["value"][tgt == 1.0] < 0).all() and (g["value"][tgt == 0.0] > 0).all()
    assert (g["value"][torch.isnan(tgt)] == 0).all()
    with pytest.raises(ValueError, match="every value-model loss is off"):
        ValueTrainConfig(value_loss="none", conservative_weight=0, contrastive_weight=0)
    with pytest.raises(ValueError, match="fenced"):
        ValueTrainConfig(style="tool")


# -- a trained value model steers step search ------------------------------------------------------
@pytest.fixture(scope="module")
def kernel():
    from tirforge.executors import ExecutorConfig, make_executor

    k = make_executor(ExecutorConfig(backend="local", timeout=10))
    k.start()
    yield k
    k.close()


@pytest.mark.parametrize("good", ["42", "13"])
def test_trained_value_model_steers_step_search(tmp_path, kernel, good, monkeypatch):
    from .test_search import ADD, MUL, Prefers, search

    # Log what step search finds with either preference: both branches, graded.
    logged = []
    for pref in ("42", "13"):
        res, _ = search(kernel, Prefers(pref), beam_width=2, expansions_per_step=2)
        logged += res.finished
    assert {t.steps[0].text for t in logged} == {MUL, ADD}
    data = tmp_path / "logged.jsonl"
    # The log's verdicts say which branch is right, at both forks (turn 1: the method, turn 3:
    # the answer); flipped, the model must follow the data, not the task.
    right, wrong = (MUL, ADD) if good == "42" else (ADD, MUL)
    logged = [t.model_copy(update={"verdict": "correct" if t.final_answer == good
                                   and t.steps[0].text == right else "incorrect"})
              for t in logged]
    append_jsonl(data, [t.model_copy(update={"id": f"{t.id}-{i}"}) for i in range(3)
                        for t in logged])
    out = tmp_path / "value"
    r = CliRunner().invoke(__import__("tirforge.apps.cli", fromlist=["app"]).app, [
        "train", "value", "--model", tiny_model_dir(tmp_path), "--train-file", str(data),
        "--output-dir", str(out), "--max-steps", "80", "--learning-rate", "3e-3",
        "--per-device-train-batch-size", "1", "--lr-scheduler-type", "constant",
        "--save-steps", "1000", "--logging-steps", "10", "--max-length", "512"])
    assert r.exit_code == 0, r.output
    scorer = ValueScorer(str(out))
    vals = scorer.step_values(logged)
    assert all(len(v) == len(t.steps) and all(0 < x < 1 for x in v)
               for v, t in zip(vals, logged, strict=True))
    first = {t.steps[0].text: v[0] for t, v in zip(logged, vals, strict=True)}
    assert first[right] > first[wrong]  # the branch that finishes correct more often
    res, _ = search(kernel, scorer, beam_width=1, expansions_per_step=2)
    assert res.best.steps[0].text == right and res.best.final_answer == good
    # The same through `tirforge solve --strategy step-search --value PATH`.
    from .test_search import TURNS
    from .test_strategies import solve_cli

    r, _ = solve_cli(monkeypatch, TURNS, "--strategy", "step-search", "--n", "2", "--beam", "1",
                     "--value", str(out))
    assert r.exit_code == 0, r.output
    assert f"final answer: {good}" in r.output and "ExecutionScorer" not in r.output
    assert not math.isnan(res.best.score)


def test_solve_and_eval_options(monkeypatch, tmp_path):
    from tirforge.apps.cli import app

    from .test_search import TURNS
    from .test_strategies import solve_cli

    r, _ = solve_cli(monkeypatch, TURNS, "--strategy", "step-search", "--value",
                     str(tmp_path / "missing"))
    assert r.exit_code == 2 and "could not load the value model" in r.output
    r, _ = solve_cli(monkeypatch, TURNS, "--strategy", "step-search", "--value", "a", "--rm", "b")
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(app, ["eval", "--benchmarks", "gsm8k", "--value", "x"])
    assert r.exit_code == 2 and "--search-beam" in r.output
    seen: list = []
    monkeypatch.setattr("tirforge.training.value.train",
                        lambda cfg: seen.append(cfg) or cfg.output_dir)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text("")  # the trainer is replaced: only its existence counts
    r = CliRunner().invoke(app, [
        "train", "value", "-c", str(CONFIGS / "value_cpu_tiny.yaml"), "--model", str(model),
        "--train-file", "t.jsonl", "--value-loss", "mse", "--conservative-weight", "0",
        "--conservative-source", "perturbed", "--contrastive-weight", "2"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert (cfg.value_loss, cfg.conservative_weight, cfg.conservative_source,
            cfg.contrastive_weight, cfg.max_length) == ("mse", 0.0, "perturbed", 2.0, 1024)
    r = CliRunner().invoke(app, ["train", "value", "--model", str(model), "--train-file", "t",
                                 "--style", "tool"])
    assert r.exit_code == 2 and "fenced" in r.output

def test_eval_step_search_scored_by_the_value_model(tmp_path, monkeypatch):
    import json

    from tirforge.apps.cli import app

    from .data_files import FIXTURES

    monkeypatch.setenv("TIRFORGE_DATA", str(FIXTURES))  # GSM8K's first rows, committed
    seen: list[int] = []
    real = ValueScorer.score
    monkeypatch.setattr(ValueScorer, "score",
                        lambda self, ts: seen.append(len(ts)) or real(self, ts))
    value = tiny_model_dir(tmp_path, num_labels=1)  # untrained: only the wiring is tested
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, [
        "eval", "--benchmarks", "gsm8k", "--limit", "2", "--n", "2", "--search-beam", "1",
        "--model", tiny_model_dir(tmp_path), "--max-new-tokens", "8", "--max-turns", "2",
        "--concurrency", "1", "--out", str(out), "--value", value])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert "search@1x2" in data["rows"]["gsm8k"] and data["config"]["value"] == value
    assert seen and all(n >= 1 for n in seen)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scorer_reads_the_last_boundary_on_each_architecture(tmp_path, arch):
    path = tiny_model_dir(tmp_path, arch, num_labels=1)
    scorer = ValueScorer(path, max_length=200, batch_size=2)
    long = traj("p", [Step(text=f"Line {i}: " + "word " * 30) for i in range(12)], "correct")
    short = _data()[0]
    empty = traj("p", [], None)
    vals = scorer.step_values([short, long, empty])
    assert len(vals[0]) == 3 and vals[2] == []
    assert math.isnan(vals[1][0]) and not math.isnan(vals[1][-1])  # cut middle, kept end
    scores = scorer.score([short, long, empty])
    assert scores[:2] == pytest.approx([vals[0][-1], vals[1][-1]], abs=1e-5)
    assert 0 < scores[2] < 1
    # A partial trajectory scores what the whole one reads at the same step (batching apart).
    part = short.model_copy(update={"steps": short.steps[:2]})
    assert scorer.score([part])[0] == pytest.approx(vals[0][1], abs=1e-5)


@pytest.mark.parametrize("name", ["value_cpu_tiny.yaml", "value_cpu_smollm2.yaml"])
def test_shipped_configs_load(name):
    cfg = ValueTrainConfig.from_yaml(CONFIGS / name)
    assert cfg.model == "smollm2" and cfg.value_loss == "bce" and cfg.max_steps > 0
