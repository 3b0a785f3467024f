"""The co-evolution sections of ``LoopConfig`` (``infer:``, ``rm:``, ``rl:``): sampled eval with
maj@N / RM@N, a reward model trained every round and used to select the SFT data, and a final
GRPO stage shaped by the last reward model (the Qwen2.5-Math self-improvement pipeline; Yang et
al., 2024, "Qwen2.5-Math Technical Report", §2.3-2.4 and §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tirforge.training.grpo import GRPOTrainConfig
from tirforge.training.rm import RMTrainConfig


@dataclass
class InferSection:
    """RM-guided inference: N sampled trajectories per held-out problem each round."""

    n: int = 0
    """N: samples per held-out problem for maj@N, pass@N and RM@N (0: greedy eval only)."""
    temperature: float = 0.7
    """Sampling temperature (Qwen2.5-Math's evaluation samples at 0.7)."""
    top_p: float = 0.8
    """Nucleus sampling of the N samples."""


def _rm_train() -> RMTrainConfig:
    # The report's listwise RM: the samples of one query form a list, 6 of them by default.
    return RMTrainConfig(loss="listwise", max_group_size=6, num_train_epochs=1.0,
                         learning_rate=1e-5, max_length=1024, per_device_train_batch_size=2,
                         logging_steps=5, save_steps=50, save_total_limit=1)


@dataclass
class RMSection:
    """A reward model that co-evolves with the policy: RM_r is trained each round on the round's
    graded samples and chooses that round's SFT data."""

    enabled: bool = False
    """Train RM_r after each round's collection (off: ``rm_filter`` stays the only RM)."""
    init: str = "previous"
    """Warm start: ``previous`` (RM_{r-1}; round 0 and rounds after a skipped RM start from the
    round's policy) or ``policy`` (always model_r with a new score head)."""
    held_out: float = 0.25
    """Share of the round's training problems kept out of RM training, for its AUC."""
    select: bool = True
    """Choose the SFT data with RM_r: paths ordered by score, then ``select_min_score`` and
    ``select_top_k`` (off: RM_r is trained and evaluated, the data is plain RFT)."""
    select_min_score: float | None = None
    """Keep only correct paths RM_r scores at least this (None: no floor)."""
    select_top_k: int | None = 2
    """Keep the k highest-scored distinct correct paths per problem (None: ``max_per_problem``)."""
    train: RMTrainConfig = field(default_factory=_rm_train)
    """The RM trainer (``training.rm.RMTrainConfig``: loss ``listwise`` or ``pairwise``,
    max_group_size, learning_rate, max_length ...); the loop sets model, train_file, output_dir,
    resume_from_checkpoint and seed."""


def _grpo() -> GRPOTrainConfig:
    return GRPOTrainConfig(num_generations=4, per_device_train_batch_size=4, max_steps=20,
                           learning_rate=1e-6, beta=0.0, temperature=0.7, rm_alpha=0.5,
                           max_completion_length=1024, logging_steps=1, save_steps=5,
                           save_total_limit=1)


@dataclass
class RLSection:
    """GRPO from the last SFT model with the last RM shaping the reward,
    r = σ(α · r_m) + (r_v - 1), on problems neither trivial nor hopeless for it."""

    enabled: bool = False
    """Run the RL stage after the last round (``<run>/rl/``); may be switched on later."""
    samples: int = 8
    """Samples per training problem with the final SFT model for the difficulty filter."""
    min_correct: int = 2
    """Keep problems with at least this many of ``samples`` correct ..."""
    max_correct: int = 5
    """... and at most this many (the report: 2-5 of 8)."""
    max_problems: int | None = None
    """At most this many filtered problems (None: all)."""
    use_rm: bool = True
    """Shape the reward with the last RM (RM_{R-1}, else ``rm_filter``); off: r = r_v."""
    grpo: GRPOTrainConfig = field(default_factory=_grpo)
    """The GRPO trainer (``training.grpo.GRPOTrainConfig``: num_generations, max_steps,
    learning_rate, beta, temperature, rm_alpha ...). Rollouts run the loop's ``agent`` at
    ``grpo.temperature`` on the loop's kernel pool (``concurrency`` in flight); the loop sets
    model, output_dir, rm_path, resume_from_checkpoint and seed."""
