"""The loop's train stage: SFT of model_r on the round's selected data into
``round-<r>/model`` (model_{r+1}), in this process or a child (``accelerate launch`` for
several GPUs), then a LoRA merge and / or dtype cast into a plain model folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirforge.agent.pipelines.loop_config import LoopConfig, write_atomic
from tirforge.agent.pipelines.loop_report import finish_stage, read_marker

if TYPE_CHECKING:
    from tirforge.agent.pipelines.loop import Session


def complete_model(folder: Path) -> bool:
    """A finished save: config, weights and tokenizer (written last by ``train_and_save``)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists() \
        and any((folder / w).exists() for w in weights)


def sft_config(cfg: LoopConfig, r: int, rd: Path, init: str, out: Path) -> Any:
    """Round r's ``SFTTrainConfig``: the ``sft`` section on ``init`` and the round's data."""
    # An interrupted SFT continues where it stopped.
    resume = "latest" if any(out.glob("checkpoint-*")) else None
    return replace(cfg.sft, model=init, train_file=str(rd / "train.jsonl"), output_dir=str(out),
                   seed=cfg.seed + r, resume_from_checkpoint=resume)


def run_sft(cfg: LoopConfig, sft_cfg: Any, rd: Path, log: Any = print) -> None:
    """Train here, or in a child process (``sft_subprocess``, ``sft_accelerate_config``)."""
    if not (cfg.sft_subprocess or cfg.sft_accelerate_config):
        from tirforge.training.sft import train

        train(sft_cfg)
        return
    import yaml

    path = rd / "sft.yaml"
    write_atomic(path, yaml.safe_dump(asdict(sft_cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "tirforge.apps.cli", "train", "sft", "-c", str(path)]
    if cfg.sft_accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               cfg.sft_accelerate_config, "-m", *cmd[2:]]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def finalize(init: str, trained: Path, dest: Path, *, lora: bool, dtype: str | None) -> None:
    """Write the next round's plain model folder from an SFT output: merge a LoRA adapter into
    ``init`` and/or cast the weights (the trainer saves float32), atomically (tmp + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(init if lora else str(trained),
                                                 dtype=torch.float32)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained)).merge_and_unload()
    if dtype:
        model = model.to(getattr(torch, dtype))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(trained)).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier save, if any
    os.replace(tmp, dest)


def stage_train(s: Session, r: int, rd: Path, model_label: str, init: str) -> dict:
    """SFT of ``init`` (model_r, or the base model) on the round's data into
    ``round-<r>/model``; with nothing selected, record the skip and keep model_r."""
    cfg, t0 = s.cfg, time.perf_counter()
    examples = (read_marker(rd, "select") or {}).get("kept", 0)
    if not examples:
        return finish_stage(rd, "train", {
            "skipped": True, "model": model_label, "examples": 0,
            "reason": "no correct distinct trajectory selected: SFT skipped, model unchanged"})
    dest = rd / "model"
    reused = complete_model(dest)
    if not reused:
        s.release()
        # LoRA or a dtype cast: train elsewhere, then write the plain folder in one step.
        post = cfg.sft.lora or cfg.save_dtype is not None
        out = (rd / "adapter" if cfg.sft.lora else rd / "sft") if post else dest
        s.log(f"round {r}: SFT of {init} on {examples} examples -> {dest}")
        if not (post and (complete_adapter(out) or complete_model(out))):
            run_sft(cfg, sft_config(cfg, r, rd, init, out), rd, s.log)
        for ckpt in out.glob("checkpoint-*"):  # only needed to resume; ~3x the model each
            shutil.rmtree(ckpt, ignore_errors=True)
        if post:
            finalize(init, out, dest, lora=cfg.sft.lora, dtype=cfg.save_dtype)
            if not cfg.sft.lora:
                shutil.rmtree(out, ignore_errors=True)  # a float32 duplicate of the model
    return finish_stage(rd, "train", {
        "skipped": False, "model": f"round-{r}/model", "examples": examples,
        "init": cfg.sft_init, "lora": cfg.sft.lora, "epochs": cfg.sft.num_train_epochs,
        "reused": reused, "seconds": round(time.perf_counter() - t0, 1)})


def complete_adapter(folder: Path) -> bool:
    """A finished LoRA save (adapter weights + tokenizer)."""
    return (folder / "adapter_config.json").exists() and (
        folder / "tokenizer_config.json").exists()
