"""Preference and reward data on trajectories longer than max_length: the end survives, bad pairs
are skipped and named, pairs identical after truncation are dropped, all counted in one line."""

import logging

import pytest

from tirforge.training.dpo import DPOTrainConfig, build_dataset, pair_example
from tirforge.training.rm import RewardScorer, RMTrainConfig, listwise_groups, pairwise_dataset
from tirforge.training.truncation import IGNORE_INDEX, MARKER, keep_end
from tirforge.trajectories.schema import append_jsonl

from .training_utils import tiny_model_dir, tokenizer, toy_trajectory

L = 160
FILLER = "Let me double-check each partial sum carefully before going on. " * 12  # ~150 tokens


def _traj(pid, correct, *, middle="", box=None, tail_output=None, problem=None):
    """A toy trajectory of problem ``pid``: ``middle`` is added to its first step; ``box`` sets
    the final answer; ``tail_output`` makes it end on that executor output (out of turns)."""
    t = toy_trajectory(2, 3, correct=correct, problem_id=pid)
    if problem is not None:
        t.problem = problem
        t.messages[1]["content"] = problem
    t.steps[0].text = middle + t.steps[0].text
    if box is not None:
        t.steps[-1].text = f"The sum is \\boxed{{{box}}}."
    if tail_output is not None:
        t.steps = [t.steps[0].model_copy(update={"output": tail_output})]
        t.stop_reason = "max_turns"
    return t


def _file(tmp_path):
    """Five problems, one (correct, incorrect) pair each; counts below are per max_length=L."""
    pairs = {
        # A: short, nothing cut.
        "A": (_traj("A", True), _traj("A", False)),
        # B: long, differ only in the final box: right-cutting made them identical.
        "B": (_traj("B", True, middle=FILLER, box=5), _traj("B", False, middle=FILLER, box=6)),
        # C: long, differ only in the middle; same end: identical after truncation, dropped.
        "C": (_traj("C", True, middle="Fine. " + FILLER, box=5),
              _traj("C", False, middle="Hmm. " + FILLER, box=5)),
        # D: the incorrect one ends on a long output: nothing it wrote survives, skipped.
        "D": (_traj("D", True), _traj("D", False, tail_output="7 " * 300)),
        # E: a problem longer than max_length (the case that aborted the DPO build).
        "E": (_traj("E", True, problem="Add. " + FILLER + " What is 2 + 3?"),
              _traj("E", False, problem="Add. " + FILLER + " What is 2 + 3?")),
    }
    path = tmp_path / "long.jsonl"
    append_jsonl(path, [t for pair in pairs.values() for t in pair])
    return path, pairs


def _report(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "tirforge.training" and r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    return lines[0]


def test_keep_end_rule():
    ids, labels = list(range(100)), [IGNORE_INDEX] * 10 + list(range(10, 100))
    same = keep_end(ids, labels, 10, 100, [-1, -2])
    assert (same.input_ids, same.cut, same.prompt_length) == (ids, 0, 10)
    f = keep_end(ids, labels, 10, 40, [-1, -2])  # prompt 10 <= 40 // 2: all of it
    assert f.input_ids == list(range(10)) + [-1, -2] + list(range(72, 100))
    assert f.labels[10:12] == [IGNORE_INDEX] * 2 and f.labels[12:] == list(range(72, 100))
    assert (f.prompt_length, f.cut, len(f.input_ids)) == (10, 62, 40)
    g = keep_end(ids, labels, 60, 40, [-1, -2])  # prompt longer than half: its first 20
    assert g.input_ids[:20] == list(range(20)) and g.input_ids[-1] == 99
    assert (g.prompt_length, len(g.input_ids)) == (20, 40)
    h = keep_end(ids, labels, 10, 6, [-1, -2])  # marker > a quarter of the budget: left out
    assert h.input_ids == [0, 1, 2, 97, 98, 99]


def test_dpo_pair_keeps_the_final_answers(tmp_path):
    _, pairs = _file(tmp_path)
    tok = tokenizer()
    cfg = DPOTrainConfig(max_length=L)
    ex = pair_example(*pairs["B"], tok, cfg)
    assert ex["truncated"] == 2
    for side, box in (("chosen", "5"), ("rejected", "6")):
        ids = ex[f"{side}_ids"]
        assert len(ex["prompt_ids"]) + len(ids) == L
        text = tok.decode(ids)
        assert MARKER.strip() in text and f"\\boxed{{{box}}}" in text
        scored = tok.decode([i for i, m in zip(ids, ex[f"{side}_mask"], strict=True) if m])
        assert MARKER.strip() not in scored and scored.endswith(f"\\boxed{{{box}}}.<|im_end|>")
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert ex["chosen_ids"] != ex["rejected_ids"]


def test_dpo_dataset_skips_drops_and_reports(tmp_path, caplog):
    path, pairs = _file(tmp_path)
    cfg = DPOTrainConfig(train_file=str(path), max_length=L, max_pairs_per_problem=1)
    with caplog.at_level(logging.INFO, logger="tirforge.training"):
        ds = build_dataset(cfg, tokenizer())
    assert len(ds) == 3  # A, B, E
    line = _report(caplog)
    # Sequences of the 4 pairs not skipped (A, B, C, E); cut: both sides of B, C and E.
    assert "DPO pairs: 3 kept; 6 of 8 sequences longer than max_length=160 truncated" in line
    c, d = pairs["C"], pairs["D"]
    assert f"1 dropped, identical after truncation: ['C': {c[0].id} vs {c[1].id}]" in line
    assert f"1 skipped: ['D': {d[0].id} vs {d[1].id} (rejected has no trainable token" in line
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= L for r in ds)


def test_rm_pairs_and_groups_drop_identical_and_report(tmp_path, caplog):
    path, pairs = _file(tmp_path)
    tok = tokenizer()
    cfg = RMTrainConfig(train_file=str(path), max_length=L, max_pairs_per_problem=1)
    with caplog.at_level(logging.INFO, logger="tirforge.training"):
        ds = pairwise_dataset(cfg, tok)
    # The RM reads whole sequences: D is kept (its sides differ); only C collides.
    assert len(ds) == 4 and all(len(r["chosen_ids"]) <= L for r in ds)
    line = _report(caplog)
    c = pairs["C"]
    assert "RM pairs: 4 kept; 7 of 10 sequences longer than max_length=160 truncated" in line
    assert f"1 dropped, identical after truncation: ['C': {c[0].id} vs {c[1].id}]" in line
    b_correct = next(r for r in ds if tok.decode(r["chosen_ids"]).count("boxed{5}"))
    assert "\\boxed{6}" in tok.decode(b_correct["rejected_ids"])  # B: both final boxes kept
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tirforge.training"):
        groups = listwise_groups(cfg, tok)
    assert len(groups) == 4
    line = _report(caplog)
    assert "RM groups: 4 kept; 7 of 10 sequences" in line
    assert f"2 dropped, identical after truncation: ['C': {c[0].id}; 'C': {c[1].id}]" in line
    assert "1 skipped: ['C': no correct/incorrect pair left]" in line


def test_scorer_fits_long_partial_trajectories(tmp_path):
    """`tirforge score` and step search: two partial trajectories sharing a long beginning and
    differing only at the end get different inputs (they were one sequence when cut right)."""
    path = tiny_model_dir(tmp_path, num_labels=1)
    scorer = RewardScorer(path, max_length=L, device="cpu")
    a = _traj("S", True, middle=FILLER, box=5)
    b = _traj("S", True, middle=FILLER, box=6)
    short = _traj("S", True)
    sa, sb, ss = scorer.score([a, b, short])
    assert sa != sb and scorer.truncated == 2
    # Scoring alone or in a batch gives the same score (padding does not leak into it).
    assert scorer.score([a])[0] == pytest.approx(sa, abs=1e-5)
    assert scorer.score([short])[0] == pytest.approx(ss, abs=1e-5)
