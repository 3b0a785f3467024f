import pytest
import torch

from tirforge.training.rm import (
    RewardScorer,
    RMTrainConfig,
    listwise_groups,
    listwise_loss,
    pairwise_dataset,
    train,
)
from tirforge.trajectories.schema import append_jsonl, read_jsonl

from .training_utils import tiny_model_dir, tokenizer, toy_trajectory


def _toy(n_problems=4):
    """Per problem: two correct samples, two incorrect ones whose last turn hedges."""
    out = []
    for p in range(n_problems):
        for k in range(2):
            out.append(toy_trajectory(p, k + 1, problem_id=f"toy/{p}"))
            bad = toy_trajectory(p, k + 1, correct=False, problem_id=f"toy/{p}")
            bad.steps[-1].text = "Hmm, maybe guess wrong wrong \\boxed{0}."
            out.append(bad)
    return out


def _cfg(tmp_path, **kw):
    path = tmp_path / "graded.jsonl"
    if not path.exists():
        append_jsonl(path, _toy())
    base = dict(
        model=tiny_model_dir(tmp_path),
        train_file=str(path),
        output_dir=str(tmp_path / "rm"),
        max_steps=12,
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=100,
        lr_scheduler_type="constant",
        report_to=["none"],
        max_length=256,
    )
    return RMTrainConfig(**{**base, **kw})


def test_listwise_loss_values():
    s = torch.tensor([2.0, 0.0, 1.0])
    c = torch.tensor([True, False, False])
    expected = -(2.0 - torch.logsumexp(torch.tensor([2.0, 0.0, 1.0]), 0))
    assert torch.allclose(listwise_loss(s, c), expected)
    pairs = -(torch.nn.functional.logsigmoid(torch.tensor([2.0, 1.0]))).mean()
    assert torch.allclose(listwise_loss(s, c, "pairs"), pairs)
    # Raising a correct score lowers the loss; raising an incorrect one raises it.
    assert listwise_loss(torch.tensor([3.0, 0.0, 1.0]), c) < listwise_loss(s, c)
    assert listwise_loss(torch.tensor([2.0, 0.0, 2.0]), c) > listwise_loss(s, c)


def test_datasets_pair_and_group_by_problem(tmp_path):
    cfg = _cfg(tmp_path, max_pairs_per_problem=3)
    assert len(pairwise_dataset(cfg, tokenizer())) == 4 * 3
    groups = listwise_groups(cfg, tokenizer())
    assert len(groups) == 4 and all(sorted(g["correct"]) == [0, 0, 1, 1] for g in groups)


@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_rm_learns_to_rank_correct_higher(tmp_path, loss):
    cfg = _cfg(tmp_path, loss=loss, per_device_train_batch_size=4 if loss == "pairwise" else 2)
    out = train(cfg)
    trajs = read_jsonl(cfg.train_file)
    scores = RewardScorer(out).score(trajs)
    good = [s for s, t in zip(scores, trajs, strict=True) if t.verdict == "correct"]
    bad = [s for s, t in zip(scores, trajs, strict=True) if t.verdict != "correct"]
    assert min(good) > max(bad), (good, bad)


def test_untrained_head_does_not_rank(tmp_path):
    # Control for the test above: the same scorer on the untrained model does not separate them.
    cfg = _cfg(tmp_path)
    trajs = read_jsonl(cfg.train_file)
    model = tiny_model_dir(tmp_path)
    scores = RewardScorer(model).score(trajs)
    good = [s for s, t in zip(scores, trajs, strict=True) if t.verdict == "correct"]
    bad = [s for s, t in zip(scores, trajs, strict=True) if t.verdict != "correct"]
    assert not min(good) > max(bad)


def test_rm_needs_both_kinds(tmp_path):
    path = tmp_path / "only_good.jsonl"
    append_jsonl(path, [toy_trajectory(1, 2), toy_trajectory(1, 3)])
    cfg = _cfg(tmp_path, train_file=str(path))
    with pytest.raises(ValueError, match="both a correct and an incorrect"):
        pairwise_dataset(cfg, tokenizer())
    with pytest.raises(ValueError, match="both a correct and an incorrect"):
        listwise_groups(cfg, tokenizer())


def test_score_command_writes_scores(tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    cfg = _cfg(tmp_path)
    rm_dir = tiny_model_dir(tmp_path, num_labels=1)  # a saved random head: enough for plumbing
    out = tmp_path / "scored.jsonl"
    res = CliRunner().invoke(app, ["score", cfg.train_file, "--rm", rm_dir, "--out", str(out)])
    assert res.exit_code == 0, res.output
    scored = read_jsonl(out)
    assert len(scored) == 16 and all(isinstance(t.score, float) for t in scored)
    assert [t.score for t in scored] == pytest.approx(RewardScorer(rm_dir).score(scored), abs=1e-5)
    assert len({round(t.score, 6) for t in scored}) > 1


def _bf16_model_dir(tmp_path) -> str:
    """The tiny model saved in bfloat16, like the cached SmolLM2 checkpoint."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path)
    out = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(out)
    tokenizer().save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_rm_trains_in_float32_from_a_bf16_checkpoint(tmp_path, loss):
    # Regression: transformers v5 loads a checkpoint in its saved dtype, so the RM (built here, not
    # by TRL, which defaults to float32) trained SmolLM2's bf16 cache with bf16 weights and Adam
    # state: 530 s/step on the 2-core CPU instead of ~100 s, and lr 1e-5 updates rounded away.
    from tirforge.training.rm import make_trainer

    cfg = _cfg(tmp_path, model=_bf16_model_dir(tmp_path), loss=loss)
    trainer = make_trainer(cfg)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_scorer_uses_float32_on_cpu(tmp_path):
    scorer = RewardScorer(_bf16_model_dir(tmp_path), device="cpu")
    assert scorer.model.dtype == torch.float32


@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_rm_head_init_is_seeded(tmp_path, loss):
    # Regression: the score head (absent from a policy checkpoint) was initialised before the
    # Trainer seeded, so two runs of one config started from different heads (SmolLM2 RM, first
    # step loss 1.85 in one run, 0.65 in the next).
    from tirforge.training.rm import make_trainer

    def head(seed: int, rng_state: int) -> torch.Tensor:
        cfg = _cfg(tmp_path, loss=loss, seed=seed)
        torch.manual_seed(rng_state)  # whatever ran before in the process
        return make_trainer(cfg).model.score.weight.detach()

    assert torch.equal(head(0, 1), head(0, 2))
    assert not torch.equal(head(0, 1), head(1, 1))
