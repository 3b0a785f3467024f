"""``LoopConfig``: one self-improvement run (``configs/loop-*.yaml``), and its lock on the run
folder.

The agent, executor and SFT settings are the library's own dataclasses, nested as sections
(``agent:``, ``executor:``, ``sft:``); a section names only what it changes from the loop's
defaults. The flat keys of earlier versions (``max_turns``, ``cell_timeout``, ``sft_lr``,
``sft_extra`` ...) are refused with their new spelling; a run folder locked with them is still
read (they are mapped).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tirforge.agent.backends.base import SamplingParams
from tirforge.agent.graph import AgentConfig
from tirforge.agent.pipelines.loop_sections import InferSection, RLSection, RMSection
from tirforge.executors.config import ExecutorConfig
from tirforge.training.config import build, flatten, load_yaml, near_spelling, to_plain
from tirforge.training.sft import SFTTrainConfig


def _agent() -> AgentConfig:
    return AgentConfig(max_turns=4, sampling=SamplingParams(max_new_tokens=384, temperature=0.7))


def _sft() -> SFTTrainConfig:
    # The loop's SFT defaults: a round trains on a few hundred RFT examples.
    return SFTTrainConfig(num_train_epochs=2.0, max_length=1024, per_device_train_batch_size=2,
                          gradient_accumulation_steps=4, only_correct=True, logging_steps=5,
                          save_total_limit=1)


@dataclass
class LoopConfig:
    """One self-improvement run; every field has a default."""

    name: str = "default"
    """Run name: everything goes to ``<out_dir>/<name>``."""
    out_dir: str = "runs/loop"
    """Parent folder of runs."""
    model: str = "smollm2"
    """Base model (round 0): alias, local folder, or hub id (with ``allow_network``)."""
    backend: str = "transformers"
    """Collection / eval backend: ``transformers`` (CPU or GPU) or ``vllm`` (in-process, GPU).
    Each round loads the newly trained folder, so a fixed ``openai`` server cannot be used."""
    vllm_max_model_len: int | None = None
    """vLLM context length (None: the model's own, e.g. 4096 for Qwen2.5-Math)."""
    vllm_gpu_memory_utilization: float = 0.85
    """Share of GPU memory the vLLM engine takes."""
    allow_network: bool = False
    """Allow hub downloads of ``model`` (else HF_HUB_OFFLINE=1)."""

    train_dataset: str = "mawps"
    """Training problems: a registered dataset (``trajectories.datasets``) or a file."""
    train_start: int = 0
    """First row of the training slice (after de-duplication and shuffling)."""
    train_limit: int | None = 48
    """Training problems (None: to the end of the dataset)."""
    eval_dataset: str = "mawps"
    """Held-out problems; must share no id and no problem text with the training slice."""
    eval_start: int = 1000
    """First row of the eval slice (same dataset as training: pick a disjoint range)."""
    eval_limit: int | None = 100
    """Eval problems (None: to the end)."""
    shuffle: bool = True
    """Shuffle each dataset with ``seed`` before slicing (sources are often sorted by type)."""

    rounds: int = 2
    """Training rounds R: rounds 0 .. R-1 collect and train, round R only evaluates (R+1 evals).
    Raising it on an existing run continues the run."""
    samples_per_problem: int = 4
    """K: sampled trajectories per training problem and round."""
    concurrency: int = 8
    """Trajectories in flight (kernels, model batch size)."""
    agent: AgentConfig = field(default_factory=_agent)
    """The collection's agent (``agent.graph.AgentConfig``: format, max_turns, sampling
    temperature / top_p / max_new_tokens, ...). Eval uses it greedily (temperature 0)."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Kernels (``executors.ExecutorConfig``: backend, sandbox, timeout = the cell timeout,
    memory_mb, ...); ``pool_size`` is set from ``concurrency``."""

    max_per_problem: int | None = 4
    """Distinct correct paths kept per problem (None: all)."""
    dedup: bool = True
    """RFT distinct-path de-duplication (off: every correct trajectory, up to the cap)."""
    accumulate: bool = False
    """Select from the collections of every round so far, not only this round's."""
    rm_filter: str | None = None
    """Outcome reward model folder (``tirforge train rm``): keep only correct trajectories it
    scores at least ``rm_threshold`` (None: no filter)."""
    rm_threshold: float = 0.0
    """Score floor for ``rm_filter``."""

    evolve: bool = False
    """Also rewrite training problems into new ones each round (MuggleMath / DotaMath types),
    labelled by TIR consensus; accepted ones join that round's collection."""
    evolve_seeds: int = 8
    """Seed problems per round (a different window of the training slice each round)."""
    evolve_types: list[str] | None = None
    """Evolution types (None: all in ``trajectories/prompts/evolve``)."""
    evolve_per_type: int = 1
    """New problems per seed and type."""
    evolve_label_samples: int = 4
    """TIR samples voting on a new problem's answer."""
    evolve_threshold: float = 0.5
    """Agreement needed to accept a consensus answer."""
    evolve_max_new_tokens: int = 384
    """Tokens for one rewrite."""

    sft: SFTTrainConfig = field(default_factory=_sft)
    """The SFT of each round (``training.sft.SFTTrainConfig``: num_train_epochs, learning_rate,
    lora, max_length, per_device_train_batch_size, ...). The loop sets ``model``,
    ``train_file``, ``output_dir``, ``resume_from_checkpoint`` and ``seed`` (= ``seed`` + round)
    itself, so the section may not."""
    sft_init: str = "current"
    """``current``: train model_r into model_{r+1} (iterated RFT); ``base``: train the base
    model each round (expert iteration; pair with ``accumulate``)."""
    save_dtype: str | None = None
    """Cast each trained model to this dtype (``bfloat16``) before saving it: the trainer keeps
    float32 weights, which would make vLLM serve the next round in float32 (None: keep)."""
    sft_subprocess: bool = False
    """Run SFT in a child process (``tirforge train sft``): frees every byte of GPU memory the
    collection engine held. Always on with ``sft_accelerate_config``."""
    sft_accelerate_config: str | None = None
    """``accelerate launch --config_file`` for multi-GPU SFT (configs/accelerate/*.yaml)."""

    infer: InferSection = field(default_factory=InferSection)
    """RM-guided inference each round: N samples per held-out problem, maj@N, RM@N
    (``loop_sections.InferSection``)."""
    rm: RMSection = field(default_factory=RMSection)
    """The co-evolving reward model: RM_r trained each round, selecting the round's SFT data
    (``loop_sections.RMSection``)."""
    rl: RLSection = field(default_factory=RLSection)
    """The final GRPO stage with the last RM (``loop_sections.RLSection``)."""

    eval_max_new_tokens: int | None = None
    """Tokens per turn in eval (None: ``agent.sampling.max_new_tokens``)."""
    eval_max_turns: int | None = None
    """Turns in eval (None: ``agent.max_turns``)."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples for the accuracy CI."""
    ci_level: float = 0.95
    """Confidence level of the CI."""
    seed: int = 0
    """Dataset shuffling, bootstrap and SFT seed."""

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> LoopConfig:
        """Fields from a YAML mapping (nested sections for ``agent``, ``executor``, ``sft``),
        then top-level ``overrides`` (None ignored). Raises ValueError naming an unknown key, an
        old flat key with its new spelling, or a setting the loop cannot run with."""
        try:
            return cls.from_dict(load_yaml(path), **overrides)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> LoopConfig:
        """As ``from_yaml``, from a mapping."""
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        old = sorted(k for k in data if k in FLAT_KEYS and not _is_section(k, data[k]))
        problems = ["flat keys of the old loop config; nest them: " + ", ".join(
            f"{k} -> {FLAT_KEYS[k]}" for k in old)] if old else []
        unknown = unknown_keys(cls, {k: v for k, v in data.items() if k not in old})
        if unknown:  # every typo at once, each with its nearest spelling
            problems.append(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        if problems:
            raise ValueError("; ".join(problems))

        def sub(name: str, key: str) -> Any:
            sec = data.get(name)
            return sec.get(key) if isinstance(sec, dict) else None

        sections = {"sft": data.get("sft"), "rm.train": sub("rm", "train"),
                    "rl.grpo": sub("rl", "grpo")}
        set_by_loop = sorted(f"{name}.{k}" for name, sec in sections.items()
                             if isinstance(sec, dict) for k in set(sec) & SET_BY_LOOP)
        if set_by_loop:
            raise ValueError(f"{', '.join(set_by_loop)}: set by the loop each round "
                             "(model_r, the round's data and folder, seed + round); remove them")
        cfg = build(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject settings the loop cannot run with (before any work starts)."""
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if self.samples_per_problem < 1:
            raise ValueError("samples_per_problem must be >= 1")
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"backend must be transformers or vllm, not {self.backend!r}")
        if self.sft_init not in ("current", "base"):
            raise ValueError(f"sft_init must be current or base, not {self.sft_init!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '.', '_', '-' only")
        self.agent.fmt  # noqa: B018 - raises for an unknown format
        if self.infer.n < 0:
            raise ValueError("infer.n must be >= 0")
        if self.rm.init not in ("previous", "policy"):
            raise ValueError(f"rm.init must be previous or policy, not {self.rm.init!r}")
        if not 0.0 <= self.rm.held_out < 1.0:
            raise ValueError("rm.held_out must be in [0, 1)")
        if self.rm.enabled and self.rm_filter:
            raise ValueError("rm.enabled trains a reward model each round; rm_filter is the "
                             "fixed one: set one of them")
        if self.rm.select_top_k is not None and self.rm.select_top_k < 1:
            raise ValueError("rm.select_top_k must be >= 1 or null")
        if self.rm.train.lora or self.rl.grpo.lora:
            raise ValueError("rm.train.lora / rl.grpo.lora: the loop loads each trained folder "
                             "as a plain model; train every weight")
        rl = self.rl
        if not 0 <= rl.min_correct <= rl.max_correct <= rl.samples:
            raise ValueError(f"rl: need 0 <= min_correct <= max_correct <= samples, got "
                             f"{rl.min_correct}, {rl.max_correct}, {rl.samples}")
        if rl.grpo.per_device_train_batch_size % rl.grpo.num_generations:
            raise ValueError("rl.grpo.per_device_train_batch_size must be a multiple of "
                             "rl.grpo.num_generations")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def eval_agent(self) -> AgentConfig:
        """The eval's agent: greedy (temperature 0), with the eval's own budgets if set."""
        return replace(self.agent, max_turns=self.eval_max_turns or self.agent.max_turns,
                       sampling=SamplingParams(max_new_tokens=self.eval_max_new_tokens
                                               or self.agent.sampling.max_new_tokens,
                                               temperature=0.0))

    def sample_agent(self) -> AgentConfig:
        """The agent of RM-guided inference: the eval's budgets at ``infer`` sampling."""
        greedy = self.eval_agent()
        return replace(greedy, sampling=replace(greedy.sampling, temperature=self.infer.temperature,
                                                top_p=self.infer.top_p))

    def rl_agent(self) -> AgentConfig:
        """The agent of RL rollouts: the collection's, at ``rl.grpo.temperature``, unseeded
        (a fixed seed would repeat every step's draws)."""
        return replace(self.agent, sampling=replace(
            self.agent.sampling, temperature=self.rl.grpo.temperature, seed=None))

    def executor_config(self) -> ExecutorConfig:
        """``executor`` with one kernel per trajectory in flight."""
        return replace(self.executor, pool_size=max(1, self.concurrency))


FLAT_KEYS = {
    "format": "agent.format", "max_turns": "agent.max_turns",
    "max_new_tokens": "agent.sampling.max_new_tokens",
    "temperature": "agent.sampling.temperature", "top_p": "agent.sampling.top_p",
    "cell_timeout": "executor.timeout", "executor": "executor.backend",
    "sandbox": "executor.sandbox", "sft_epochs": "sft.num_train_epochs",
    "sft_lr": "sft.learning_rate", "sft_lora": "sft.lora", "sft_max_length": "sft.max_length",
    "sft_batch_size": "sft.per_device_train_batch_size",
    "sft_grad_accum": "sft.gradient_accumulation_steps",
    "sft_extra": "sft.<field> (e.g. sft.warmup_steps)",
}
"""Old flat key -> its place in the nested config."""
SET_BY_LOOP = frozenset({"model", "train_file", "output_dir", "resume_from_checkpoint", "seed",
                         "rm_path"})


def unknown_keys(cls: type, data: Any, where: str = "") -> list[str]:
    """Every key of ``data`` (nested sections included, as dotted paths) that is no field of
    dataclass ``cls``, in the order written, each with ``(did you mean ...?)`` when a field is
    spelled close (``difflib``). A section that is not a mapping is left to ``build``."""
    if not isinstance(data, dict):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out = []
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in fields:
            out.append(near_spelling(key, fields, where))
            continue
        f = fields[key]
        proto = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(proto):
            out += unknown_keys(type(proto), value, f"{path}.")
    return out


def _is_section(key: str, value: Any) -> bool:
    return key == "executor" and isinstance(value, dict)  # the new section, not the old string


def migrate_flat(data: dict[str, Any]) -> dict[str, Any]:
    """An old flat config (a run folder's lock) in the nested spelling."""
    out = {k: v for k, v in data.items() if not (k in FLAT_KEYS and not _is_section(k, v))}
    for key, value in data.items():
        if key not in FLAT_KEYS or _is_section(key, value):
            continue
        if key == "sft_extra":
            out.setdefault("sft", {}).update(value or {})
            continue
        *parents, leaf = FLAT_KEYS[key].split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# Settings that may change between runs of one run dir: they do not change what a stage makes.
RESUMABLE_FIELDS = frozenset({
    "rounds", "concurrency", "executor.backend", "executor.sandbox", "executor.pool_size",
    "executor.image", "executor.startup_timeout", "allow_network", "sft_subprocess",
    "sft_accelerate_config", "out_dir", "rl.enabled",
})


def check_run_config(cfg: LoopConfig) -> None:
    """Save the config on the first run; later runs must match it (bar ``RESUMABLE_FIELDS``),
    since finished stages are reused and would silently mix two configs. A lock written with
    the old flat keys is read through ``migrate_flat``; a field added since then counts as its
    default, one removed since then is ignored. Raises ValueError naming the fields that differ."""
    import yaml

    path = cfg.run_dir / "config.yaml"
    current = to_plain(cfg)
    if path.exists():
        saved = flatten(migrate_flat(yaml.safe_load(path.read_text()) or {}))
        now, default = flatten(current), flatten(to_plain(LoopConfig()))
        diff = sorted(k for k in now if k not in RESUMABLE_FIELDS
                      and saved.get(k, default.get(k)) != now[k])
        if diff:
            raise ValueError(
                f"{cfg.run_dir} was started with a different config ({', '.join(diff)} differ); "
                "use another name or restore the settings in its config.yaml")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(current, sort_keys=False))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
