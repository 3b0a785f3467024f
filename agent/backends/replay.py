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

    def __init__(self, turns: list[str] | dict[str, list[str]]):
        """``turns``: one script, or a script per key: "problem id#sample" (from the request's
        ``tag``) or the start of its user turn. A tagged request (the runner tags each trajectory's)
        plays its own copy of the script, so concurrent trajectories never consume each
        other's turns; untagged requests share and consume one script."""
        self.scripts = (
            {k: list(v) for k, v in turns.items()} if isinstance(turns, dict) else None
        )
        self.turns = [] if isinstance(turns, dict) else list(turns)
        self._copies: dict[str, list[str]] = {}
        self.calls: list[Request] = []
        """Every request received, for inspection (what the model would have seen)."""
        self.batch_sizes: list[int] = []
        """Requests per ``generate`` call (how well a runner batched them)."""

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> ReplayBackend:
        return cls([s.text for s in traj.steps])

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        out = []
        self.batch_sizes.append(len(requests))
        # All or nothing, as a real engine: a batch that fails consumes no turn, so its good
        # requests can be sent again (the runner splits a failing batch).
        scripts = [self._script(req) for req in requests]
        need: dict[int, int] = {}
        for turns in scripts:
            need[id(turns)] = need.get(id(turns), 0) + 1
            if need[id(turns)] > len(turns):
                raise ReplayExhausted(f"script exhausted after {len(self.calls)} turns")
        for req, turns in zip(requests, scripts, strict=True):
            self.calls.append(req)
            text = turns.pop(0)
            reason = "stop" if req.stop is not None and req.stop(text) else "eos"
            out.append(Completion(text=text, finish_reason=reason, n_tokens=len(text.split())))
        return out

    def _script(self, req: Request) -> list[str]:
        if req.tag and req.tag in self._copies:
            return self._copies[req.tag]
        turns = self.turns if self.scripts is None else self._match(req)
        if req.tag:
            turns = self._copies[req.tag] = list(turns)
        return turns

    def _match(self, req: Request) -> list[str]:
        assert self.scripts is not None
        key = req.tag.rsplit("@", 1)[0]  # "problem id#sample"
        if key in self.scripts:
            return self.scripts[key]
        user = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
        for problem, turns in self.scripts.items():
            if user.startswith(problem):
                return turns
        raise ReplayExhausted(f"no script for problem {user[:60]!r}")
