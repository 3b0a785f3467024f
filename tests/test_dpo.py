import torch

from tirforge.training.dpo import DPOTrainConfig, make_trainer, pair_example
from tirforge.trajectories.schema import append_jsonl

from .training_utils import tiny_model_dir, tokenizer, toy_trajectory


def _rejected(a, b, out="5"):
    """An incorrect trajectory that ends on an executor output (ran out of turns)."""
    t = toy_trajectory(a, b, correct=False)
    t.steps = [t.steps[0].model_copy(update={"output": out})]
    t.verdict, t.stop_reason, t.final_answer = "incorrect", "max_turns", None
    return t


def _cfg(tmp_path, **kw):
    path = tmp_path / "pairs.jsonl"
    if not path.exists():
        append_jsonl(path, [x for i in range(3) for x in (toy_trajectory(i, 2), _rejected(i, 2))])
    base = dict(
        model=tiny_model_dir(tmp_path),
        train_file=str(path),
        output_dir=str(tmp_path / "dpo"),
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=3,
        logging_steps=1,
        save_steps=100,
        lr_scheduler_type="constant",
        report_to=["none"],
        beta=0.1,
    )
    return DPOTrainConfig(**{**base, **kw})


def test_pair_masks_cover_exactly_the_model_text(tmp_path):
    tok = tokenizer()
    cfg = _cfg(tmp_path)
    ex = pair_example(toy_trajectory(), _rejected(2, 3, "SECRET"), tok, cfg)
    for side in ("chosen", "rejected"):
        ids, mask = ex[f"{side}_ids"], ex[f"{side}_mask"]
        assert len(ids) == len(mask)
        scored = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert "```output" not in scored and "SECRET" not in scored
        assert scored.startswith("Let me compute it.")
    assert "SECRET" in tok.decode(ex["rejected_ids"])
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_dpo_trains_and_ignores_output_tokens(tmp_path):
    cfg = _cfg(tmp_path)
    trainer = make_trainer(cfg)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    tok = trainer.processing_class
    # The collator's completion mask is ours: no output block is scored.
    scored = tok.decode(batch["input_ids"][batch["completion_mask"].bool()])
    assert "```output" not in scored and "Solve with Python" not in scored
    # Changing tokens of the final output (after the last scored token) leaves the loss unchanged.
    trainer.model.eval()
    with torch.no_grad():
        base, _ = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        changed = dict(batch)
        ids = batch["input_ids"].clone()
        for row in range(3, 6):  # the rejected rows
            last = int(batch["completion_mask"][row].nonzero().max())
            ids[row, last + 1 :] = torch.where(batch["attention_mask"][row, last + 1 :] == 1,
                                               (ids[row, last + 1 :] + 11) % 1000,
                                               ids[row, last + 1 :])
        assert not torch.equal(ids, batch["input_ids"])
        changed["input_ids"] = ids
        again, _ = trainer.compute_loss(trainer.model, changed, return_outputs=True)
    assert torch.allclose(base, again)
    trainer.model.train()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"], logs
