"""Settings of an AutoIF run (every stage's knobs in one dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AutoIFConfig:
    """Sizes and thresholds of the eight stages. Defaults for the cross-validation filter are
    AutoIF's (Dong et al. 2024, "Self-play with Execution Feedback", sec. 2.2): at least 3
    functions, 10 cases and accuracy >= 0.8."""

    # Stage 2: augmentation (self-instruct).
    augment_rounds: int = 4
    """Generations asking the model for new instructions (each shows a few seeds)."""
    augment_shots: int = 6
    """Seed instructions shown in one augmentation prompt."""
    max_instructions: int = 200
    """Cap on seeds + augmented instructions (after dedup)."""
    # Stage 3: verifiers.
    verifiers_per_instruction: int = 4
    """K generations per instruction, each a function + test cases as JSON."""
    # Stage 4: cross-validation.
    min_functions: int = 3
    min_cases: int = 10
    min_accuracy: float = 0.8
    cell_timeout: float = 2.0
    """Seconds one verifier call on one response may run in the kernel."""
    max_output_chars: int = 10_000
    """A verifier that prints more than this on one call fails (printing megabytes)."""
    # Stage 5: back-translation.
    backtranslate: bool = True
    judge: str = "policy"
    """"policy": the generating model judges; or a path/hub id of an NLI model (needs
    transformers' text-classification pipeline)."""
    # Stage 6: queries.
    queries_per_instruction: int = 2
    # Stage 7: responses.
    responses_per_query: int = 4
    sft_threshold: float = 1.0
    """A response enters the SFT set when its pass rate is >= this."""
    dpo_chosen_min: float = 0.5
    """DPO: chosen pass rate >= this; rejected pass rate == 0 (same query and instruction)."""
    # Generation.
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    max_batch: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "sft_threshold", "dpo_chosen_min"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("verifiers_per_instruction", "responses_per_query",
                     "queries_per_instruction", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.cell_timeout <= 0:
            raise ValueError("cell_timeout must be > 0 seconds")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
