"""What the stages share: the work folder's files, packaged data, batched generation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.agent.pipelines.autoif.config import AutoIFConfig


@dataclass(frozen=True)
class Paths:
    """The files of a run's work folder, one per stage (all JSONL unless noted)."""

    root: Path

    @property
    def seeds(self) -> Path:
        return self.root / "1_seeds.jsonl"

    @property
    def augment(self) -> Path:
        return self.root / "2_augment.jsonl"

    @property
    def instructions(self) -> Path:
        return self.root / "2_instructions.jsonl"

    @property
    def verifiers(self) -> Path:
        return self.root / "3_verifiers.jsonl"

    @property
    def crossval(self) -> Path:
        return self.root / "4_crossval.jsonl"

    @property
    def backtranslate(self) -> Path:
        return self.root / "5_backtranslate.jsonl"

    @property
    def pairs(self) -> Path:
        return self.root / "6_queries.jsonl"

    @property
    def responses(self) -> Path:
        """A trajectory ``Store`` folder."""
        return self.root / "7_responses"

    @property
    def export(self) -> Path:
        return self.root / "8_export"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"


def data_file(name: str) -> str:
    """Text of a file shipped in ``agent/pipelines/autoif/data``."""
    return (resources.files("tirforge.agent.pipelines.autoif") / "data" / name).read_text()


def data_path(name: str) -> Path:
    return Path(str(resources.files("tirforge.agent.pipelines.autoif") / "data" / name))


def params(cfg: AutoIFConfig, *, temperature: float | None = None,
           max_new_tokens: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p, seed=cfg.seed,
    )


def user_request(text: str, tag: str, seed: int) -> Request:
    return Request(messages=[{"role": "user", "content": text}], tag=tag, seed=seed)


def generate_batches(backend: Any, requests: Sequence[Request], sampling: SamplingParams,
                     max_batch: int) -> Iterator[tuple[list[Request], list[Completion]]]:
    """``requests`` in batches of ``max_batch``: yields each batch with its completions, so a
    stage can store a batch's results before generating the next (resume loses one batch)."""
    for i in range(0, len(requests), max_batch):
        batch = list(requests[i : i + max_batch])
        yield batch, backend.generate(batch, sampling)
