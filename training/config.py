"""The settings every tirforge trainer shares, and loading a config from YAML.

Each trainer module (sft, rm, dpo, grpo) subclasses ``TrainConfig`` with its own fields, TRL style;
a YAML file holds any subset of the fields and command-line overrides win over it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

C = TypeVar("C", bound="TrainConfig")
D = TypeVar("D")


# --------------------------------------------------------------------------- config files
# One set of rules for every config dataclass (trainers, the loop): a YAML mapping of field
# names, nested mappings for nested dataclasses, and a clear error for any unknown key.


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """The mapping in a YAML file ({} for None or an empty file); ValueError if not a mapping."""
    if path is None:
        return {}
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file must be a mapping of field: value")
    return loaded


def build(cls: type[D], data: dict[str, Any], *, where: str | None = None) -> D:
    """``cls(**data)``, where a mapping given for a dataclass-valued field is merged onto that
    field's default (so a section sets only what it names) and a YAML list given for a tuple
    field becomes a tuple. ValueError names any unknown key by its dotted path."""
    where = where or cls.__name__
    return cls(**_fields_from(cls, data, where, None))


def merge(obj: D, data: dict[str, Any], *, where: str) -> D:
    """A copy of dataclass ``obj`` with the (possibly nested) fields of ``data`` replaced."""
    return dataclasses.replace(obj, **_fields_from(type(obj), data, where, obj))  # type: ignore[type-var]


def _fields_from(cls: type, data: Any, where: str, base: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of field: value, not {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        named = [near_spelling(k, fields) for k in unknown]
        known = "" if all("did you mean" in n for n in named) else f"; known: {sorted(fields)}"
        raise ValueError(f"unknown {where} fields: {', '.join(named)}{known}")
    bad = [e for name, value in data.items() if (e := choice_error(cls, name, value, where))]
    if bad:
        raise ValueError("; ".join(bad))
    out = {}
    for name, value in data.items():
        proto = getattr(base, name) if base is not None else _default(fields[name])
        if dataclasses.is_dataclass(proto) and not isinstance(proto, type):
            value = merge(proto, value, where=f"{where}.{name}")
        elif isinstance(proto, tuple) and isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out


def near_spelling(word: Any, choices: Any, prefix: str = "") -> str:
    """``prefix + word``, with `` (did you mean <prefix>X?)`` when a choice is spelled close
    (``difflib``): the one rule for naming a typo in any config."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"{prefix}{word}" + (f" (did you mean {prefix}{near[0]}?)" if near else "")


@functools.cache
def _choices(cls: type) -> dict[str, tuple[str, ...]]:
    """Field name -> allowed values, for the fields of dataclass ``cls`` typed as a Literal of
    strings (or an optional one)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            lits = [a for a in args if typing.get_origin(a) is typing.Literal]
            hint, args = (lits[0], typing.get_args(lits[0])) if len(lits) == 1 else (hint, ())
        if typing.get_origin(hint) is typing.Literal and all(isinstance(a, str) for a in args):
            out[name] = args
    return out


def choice_error(cls: type, name: str, value: Any, where: str) -> str | None:
    """The message for a value outside the closed set of field ``name`` of dataclass ``cls``
    (a ``Literal`` of strings), None when it is allowed, unset (None: left to the config's own
    checks) or the field is not such a set."""
    allowed = _choices(cls).get(name)
    if allowed is None or value in allowed or value is None:
        return None
    return (f"{where}.{name} must be one of {', '.join(allowed)}, not "
            f"{near_spelling(value, allowed) if isinstance(value, str) else repr(value)}")


def check_choices(obj: Any) -> None:
    """ValueError naming every field of dataclass ``obj`` whose value is outside its
    ``Literal`` choices (for configs built in code; YAML is checked while it is read)."""
    cls = type(obj)
    bad = [e for f in dataclasses.fields(obj)
           if (e := choice_error(cls, f.name, getattr(obj, f.name), cls.__name__))]
    if bad:
        raise ValueError("; ".join(bad))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_plain(obj: Any) -> Any:
    """A dataclass as YAML-safe nested dicts and lists (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(obj))))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dotted paths, for diffs and messages)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out




@dataclass
class TrainConfig:
    model: str = ""
    """Local model folder or hub id of the policy / base model (apps resolve aliases)."""
    train_file: str = ""
    """Trajectory JSONL (one Trajectory per line) or a saved HF dataset folder."""
    output_dir: str = "runs/train"
    """Checkpoints, the final model and TensorBoard logs go here."""
    style: Literal["fenced", "tool"] = "fenced"
    """Chat layout of a trajectory: ``fenced`` (Qwen TIR, one assistant turn) or ``tool``."""
    chat_template: str | None = None
    """Path to a Jinja chat template replacing the tokenizer's (None: keep the tokenizer's)."""
    max_length: int = 2048
    """Tokens per example; longer ones are cut from the right (SFT) or keep the prompt head and
    the end (RM, DPO: ``training.truncation``)."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    num_train_epochs: float = 1.0
    """Passes over the data (ignored when ``max_steps`` > 0)."""
    max_steps: int = -1
    """Optimiser steps to run; -1: run ``num_train_epochs``."""
    per_device_train_batch_size: int = 1
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimiser step."""
    warmup_steps: float = 0
    """Learning-rate warm-up: a step count, or a float in [0, 1) as a share of all steps."""
    lr_scheduler_type: str = "cosine"
    """Transformers learning-rate schedule name."""
    logging_steps: int = 10
    """Log every this many steps."""
    save_steps: int = 500
    """Checkpoint every this many steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (None: all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or ``latest`` for the newest one in ``output_dir``."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers: tensorboard (logs under output_dir/runs), wandb, none, ..."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory on long trajectories."""
    seed: int = 0
    """Random seed for data order and initialisation."""
    lora: bool = False
    """Train a LoRA adapter (peft) instead of every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters."""

    def __post_init__(self) -> None:
        check_choices(self)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path | None, **overrides: Any) -> C:
        """Fields from a YAML mapping, then ``overrides`` (None values are ignored).

        Raises ValueError naming any unknown field, or a file that is not a mapping."""
        data = load_yaml(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return build(cls, data)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The fields that map 1:1 onto transformers/TRL ``TrainingArguments``."""
        names = (
            "output_dir learning_rate num_train_epochs max_steps per_device_train_batch_size "
            "gradient_accumulation_steps warmup_steps lr_scheduler_type logging_steps save_steps "
            "save_total_limit report_to bf16 gradient_checkpointing seed"
        ).split()
        return {n: getattr(self, n) for n in names}

    def peft_config(self):
        """A peft LoraConfig when ``lora`` is on, else None."""
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type=self._peft_task,
        )

    _peft_task = "CAUSAL_LM"

    def resume_arg(self) -> str | bool | None:
        """What ``Trainer.train(resume_from_checkpoint=...)`` takes."""
        if self.resume_from_checkpoint == "latest":
            return True
        return self.resume_from_checkpoint


def load_tokenizer(cfg: TrainConfig):
    """The model's tokenizer, with the configured chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.chat_template is not None:
        tok.chat_template = Path(cfg.chat_template).read_text()
    if tok.chat_template is None:
        raise ValueError(f"{cfg.model} has no chat template; pass chat_template=PATH")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_and_save(trainer, cfg: TrainConfig) -> str:
    """Train (resuming as ``cfg.resume`` says), save the model and tokenizer to
    ``cfg.output_dir`` and return it: the common end of every trainer module."""
    trainer.train(resume_from_checkpoint=cfg.resume_arg())
    trainer.save_model(cfg.output_dir)  # collective under DeepSpeed/FSDP: every rank calls it
    if trainer.is_world_process_zero():  # one writer for the tokenizer files
        trainer.processing_class.save_pretrained(cfg.output_dir)
    return cfg.output_dir


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body, as written in
    this package), through the base classes; the first sentence serves as CLI help."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):
            continue
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
