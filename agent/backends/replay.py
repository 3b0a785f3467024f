"""Replay backend: plays back scripted or recorded assistant turns, one per call.

Deterministic and model-free: used by tests, and to re-run a recorded trajectory against a
fresh kernel (``ReplayBackend.from_trajectory``).
"""

from __future__ import annotations

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.trajectories.schema import Trajectory


class ReplayExhausted(RuntimeError):
    """More turns were asked for than the script holds."""


class ReplayBackend:
    name = "replay"

    def __init__(self, turns: list[str]):
        self.turns = list(turns)
        self.calls: list[Request] = []
        """Every request received, for inspection (what the model would have seen)."""

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> ReplayBackend:
        return cls([s.text for s in traj.steps])

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        out = []
        for req in requests:
            if not self.turns:
                raise ReplayExhausted(f"script exhausted after {len(self.calls)} turns")
            self.calls.append(req)
            text = self.turns.pop(0)
            reason = "stop" if req.stop is not None and req.stop(text) else "eos"
            out.append(Completion(text=text, finish_reason=reason, n_tokens=len(text.split())))
        return out
