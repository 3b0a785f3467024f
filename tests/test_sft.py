import json
import math

import pytest
import torch

from tirforge.training.masking import IGNORE_INDEX
from tirforge.training.sft import SFTTrainConfig, build_dataset, make_trainer, train
from tirforge.trajectories.schema import append_jsonl

from .training_utils import tiny_model_dir, tokenizer, toy_trajectory


def _data(tmp_path, n=8):
    path = tmp_path / "train.jsonl"
    append_jsonl(path, [toy_trajectory(i % 3, 2) for i in range(n)])
    append_jsonl(path, toy_trajectory(1, 1, correct=False))
    return str(path)


def _cfg(tmp_path, **kw) -> SFTTrainConfig:
    base = dict(
        model=tiny_model_dir(tmp_path),
        train_file=_data(tmp_path),
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=3,
        lr_scheduler_type="constant",
        report_to=["tensorboard"],
    )
    return SFTTrainConfig(**{**base, **kw})


def test_dataset_is_masked_and_rft_filtered(tmp_path):
    cfg = _cfg(tmp_path)
    ds = build_dataset(cfg, tokenizer())
    assert len(ds) == 8  # the incorrect trajectory is dropped
    tok = tokenizer()
    labelled = tok.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX])
    assert "```output" not in labelled and "Solve with Python" not in labelled
    cfg.only_correct = False
    assert len(build_dataset(cfg, tok)) == 9


def test_sft_trains_resumes_and_logs(tmp_path):
    cfg = _cfg(tmp_path)
    out = train(cfg)
    trainer_logs = [h for h in _history(out) if "loss" in h]
    losses = [h["loss"] for h in trainer_logs]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # repeated examples: the loss must fall
    assert (tmp_path / "out" / "checkpoint-3").is_dir()
    assert (tmp_path / "out" / "checkpoint-6").is_dir()
    assert any((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))  # TensorBoard
    # Resume from checkpoint-3 and continue to step 8.
    resumed = _cfg(tmp_path, model=cfg.model, max_steps=8, resume_from_checkpoint="latest")
    trainer = make_trainer(resumed)
    trainer.train(resume_from_checkpoint=resumed.resume_arg())
    assert trainer.state.global_step == 8


def _history(out_dir):
    import json
    from pathlib import Path

    states = sorted(Path(out_dir).glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"]


def test_output_tokens_do_not_change_the_loss(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1)
    trainer = make_trainer(cfg)
    model = trainer.model.eval()
    ex = trainer.train_dataset[0]
    ids = torch.tensor([ex["input_ids"]])
    labels = torch.tensor([ex["labels"]])
    base = model(input_ids=ids, labels=labels).loss
    # Change every masked token that is neither the last prompt nor followed by a label... the
    # rule is simpler: a masked position's *target* is ignored, so swapping masked tokens that are
    # only targets (not inputs to later labelled positions) cannot change the loss. Check the
    # stronger causal property on the final masked run after the last label instead:
    last_label = max(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
    tail = ids.clone()
    tail[0, last_label + 1 :] = (tail[0, last_label + 1 :] + 7) % 1000
    assert torch.allclose(model(input_ids=tail, labels=labels).loss, base)
    # And the gradient w.r.t. every masked target's logit row is zero.
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g[0, :-1].abs().sum(-1) > 0, labels[0, 1:] != IGNORE_INDEX)


def test_lora_trains_only_the_adapter(tmp_path):
    cfg = _cfg(tmp_path, lora=True, lora_r=4, lora_alpha=8, max_steps=2)
    trainer = make_trainer(cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    trainer.save_model(cfg.output_dir)
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown SFTTrainConfig fields"):
        SFTTrainConfig.from_yaml(None, learning_rat=1.0)
    cfg = _cfg(tmp_path, max_length=5)
    with pytest.raises(ValueError, match="no trainable examples"):
        build_dataset(cfg, tokenizer())


def test_cli_train_sft_with_the_cpu_config(tmp_path):
    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    model, data = tiny_model_dir(tmp_path), _data(tmp_path)
    args = ["train", "sft", "-c", "configs/sft_cpu_tiny.yaml", "--model", model,
            "--train-file", data, "--output-dir", str(tmp_path / "cli"), "--max-steps", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["train", "sft", "--model", model])
    assert bad.exit_code == 2 and "no data" in bad.output


def test_every_example_config_parses():
    from pathlib import Path

    from tirforge.training.dpo import DPOTrainConfig
    from tirforge.training.grpo import GRPOTrainConfig
    from tirforge.training.rm import RMTrainConfig

    kinds = {"sft": SFTTrainConfig, "rm": RMTrainConfig, "dpo": DPOTrainConfig,
             "grpo": GRPOTrainConfig}
    # <trainer>_*.yaml only: other configs (loop-*.yaml, accelerate/) belong to other commands.
    files = [f for f in sorted(Path("configs").glob("*.yaml")) if f.name.split("_")[0] in kinds]
    assert len(files) >= 10
    for kind in kinds:  # a CPU config for the default model, for every trainer
        assert Path(f"configs/{kind}_cpu_smollm2.yaml") in files
    for f in files:
        cfg = kinds[f.name.split("_")[0]].from_yaml(f)
        assert cfg.model and cfg.output_dir.startswith("runs/")


def test_mixture_counts_fractions_and_dmt(tmp_path):
    from tirforge.training.mixture import Source, dmt_stages, load_mixture

    spec, gen = tmp_path / "tir.jsonl", tmp_path / "general.jsonl"
    append_jsonl(spec, [toy_trajectory(i, 1) for i in range(8)])
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    gen.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    gen.write_text(gen.read_text() * 2)
    mixed = load_mixture([Source(str(spec), count=3), {"path": str(gen), "fraction": 2.0}])
    assert len(mixed) == 3 + 8
    assert sum(isinstance(r, list) for r in mixed) == 8  # general rows, each file upsampled x2
    stage1, stage2 = dmt_stages([str(spec)], [str(gen)], k=0.25)
    assert len(load_mixture(stage1)) == 8
    s2 = load_mixture(stage2)
    assert len(s2) == 4 + 2 and sum(not isinstance(r, list) for r in s2) == 2
    with pytest.raises(ValueError, match="share"):
        dmt_stages([str(spec)], [str(gen)], k=2)
    # SFT reads a mixture instead of train_file; general rows train on the assistant text.
    cfg = SFTTrainConfig(model="unused", train_file="", mixture=[{"path": str(spec), "count": 2},
                         {"path": str(gen)}], max_length=512)
    ds = build_dataset(cfg, tokenizer())
    assert len(ds) == 6
    texts = {tokenizer().decode([t for t in ex["labels"] if t != IGNORE_INDEX]) for ex in ds}
    assert "hello<|im_end|>" in texts
