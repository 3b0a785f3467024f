"""Trajectories -> the dict TRL's ``rollout_func`` returns: token-faithful rows, exclusions and
per-step statistics.

Each row is the trajectory's token stream (``trajectories.tokens``): the prompt is the chat
template head, the completion everything the model saw and wrote after it up to its last sampled
token, with ``env_mask`` 1 exactly on sampled ids (taken verbatim from ``Step.token_ids``) and 0 on
executor / feedback text, tokenised once. ``logprobs`` are the sampled tokens' log-probabilities
(None on env text, which TRL maps to NaN and never uses: the mask is 0 there). Trajectories
recorded without ids (older files, backends that do not report them) fall back to
``training.masking`` (re-tokenised text, end-of-turn token labelled).

A rollout whose model calls went out as text (``token_faithful`` False: a server without
token-id prompts) keeps its sampled ids but not its logprobs.

A rollout is *excluded* (no reward, no gradient: ``env_mask`` all 0 and every reward function
returns None, which TRL 0.2x+/1.x treats as unscorable: out of the group mean and std, advantage
0) when its kernel hit an infrastructure fault (``"infra"``), or, with ``filter_void_turns``, when
one of its turns produced neither a closed code block nor a boxed answer (``"void"``, SimpleTIR).
"""

from __future__ import annotations

from typing import Any

from tirforge.executors.result import INFRA_FAULTS
from tirforge.training.masking import IGNORE_INDEX, tokenize_trajectory
from tirforge.trajectories.faults import has_infra_fault
from tirforge.trajectories.grading import extract_boxed
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.tokens import token_stream

INFRA = "infra"
"""Exclusion reason of a rollout whose cell failed for the machinery's sake: one of
``executors.result.INFRA_FAULTS`` (kernel died, did not start, no sandbox), or the rollout
itself raised."""


def is_infra_fault(traj: Trajectory) -> bool:
    """True when a cell of ``traj`` failed for infrastructure reasons (not the code's)."""
    return has_infra_fault(traj)


def is_void(step: Step) -> bool:
    """A turn that produced neither a closed code block nor a boxed answer."""
    return step.code is None and extract_boxed(step.text) is None


def exclusion(traj: Trajectory, filter_void_turns: bool) -> str | None:
    """Why ``traj`` gets no reward and no gradient ("infra", "void"), or None."""
    if traj.stop_reason == "error" and not traj.steps:
        return INFRA  # the rollout itself raised (kernel would not start, pool closed, ...)
    if is_infra_fault(traj):
        return INFRA
    if filter_void_turns and any(is_void(s) for s in traj.steps):
        return "void"
    return None


def token_faithful(traj: Trajectory) -> bool:
    """False when the model saw earlier turns as re-tokenised text, not their sampled ids
    (``sampling["token_in"] = False``, set by ``agent.pipelines.rollout`` for a server that
    takes text prompts only): its sampled logprobs were conditioned on other ids than the
    trainer's token stream, so they are not passed on (TRL's importance ratio is 1 there)."""
    return traj.sampling.get("token_in", True) is not False


def rollout_example(traj: Trajectory, tokenizer, max_completion_length: int,
                    style: str = "fenced") -> dict[str, Any]:
    """prompt_ids, completion_ids, env_mask (1 = sampled by the model) and logprobs (per
    completion token, None where not sampled or not reported) of one trajectory; plus
    ``retokenised``: model turns whose ids had to be re-tokenised from text."""
    if not any(s.token_ids is not None for s in traj.steps):
        return _retokenised_example(traj, tokenizer, max_completion_length, style)
    ts = token_stream(traj.messages, traj.steps, tokenizer)
    last = max((i for i, m in enumerate(ts.sampled) if m), default=None)
    if last is None:  # the model wrote nothing: one masked token keeps the row well-formed
        return {"prompt_ids": ts.ids[: ts.n_prompt], "completion_ids": [tokenizer.eos_token_id],
                "env_mask": [0], "logprobs": [None], "retokenised": len(ts.retokenised)}
    # Cut after the last sampled token: what follows is an unanswered output or feedback.
    end = min(last + 1, ts.n_prompt + max_completion_length)
    return {
        "prompt_ids": ts.ids[: ts.n_prompt],
        "completion_ids": ts.ids[ts.n_prompt : end],
        "env_mask": ts.sampled[ts.n_prompt : end],
        "logprobs": ts.logprobs[ts.n_prompt : end],
        "retokenised": len(ts.retokenised),
    }


def _retokenised_example(traj: Trajectory, tokenizer, max_completion_length: int,
                         style: str) -> dict[str, Any]:
    ex = tokenize_trajectory(traj, tokenizer, style)  # type: ignore[arg-type]
    labelled = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    n_turns = len(traj.steps)
    if not labelled:
        return {"prompt_ids": ex["input_ids"], "completion_ids": [tokenizer.eos_token_id],
                "env_mask": [0], "logprobs": [None], "retokenised": n_turns}
    first, last = labelled[0], labelled[-1]
    end = min(last + 1, first + max_completion_length)
    mask = [int(lab != IGNORE_INDEX) for lab in ex["labels"][first:end]]
    return {"prompt_ids": ex["input_ids"][:first], "completion_ids": ex["input_ids"][first:end],
            "env_mask": mask, "logprobs": [None] * len(mask), "retokenised": n_turns}


def rollout_batch(trajs: list[Trajectory], tokenizer, max_completion_length: int,
                  style: str = "fenced", filter_void_turns: bool = False
                  ) -> tuple[dict[str, list], dict[str, float]]:
    """(TRL ``rollout_func`` output, per-step statistics) of one step's trajectories.

    The output has prompt_ids, completion_ids, env_mask, logprobs (None when no trajectory
    reported any), and the extra fields ``trajectory`` and ``excluded`` (the reason or None),
    which TRL hands to the reward functions. Statistics are means per rollout unless named
    otherwise (``tir/*`` keys, logged by ``training.grpo``)."""
    rows = [rollout_example(t, tokenizer, max_completion_length, style) for t in trajs]
    excluded = [exclusion(t, filter_void_turns) for t in trajs]
    for row, why, t in zip(rows, excluded, trajs, strict=True):
        if why is not None:  # no gradient: not one token of it is scored
            row["env_mask"] = [0] * len(row["env_mask"])
        if not token_faithful(t):  # sampled under another tokenisation of the same text
            row["logprobs"] = [None] * len(row["logprobs"])
    have_lp = any(lp is not None for r in rows for lp in r["logprobs"])
    out: dict[str, list] = {
        "prompt_ids": [r["prompt_ids"] for r in rows],
        "completion_ids": [r["completion_ids"] for r in rows],
        "env_mask": [r["env_mask"] for r in rows],
        "logprobs": [r["logprobs"] for r in rows] if have_lp else None,  # type: ignore[dict-item]
        "trajectory": list(trajs),
        "excluded": excluded,
    }
    return out, batch_stats(trajs, rows, excluded)


def batch_stats(trajs: list[Trajectory], rows: list[dict], excluded: list[str | None]
                ) -> dict[str, float]:
    """Per-step statistics of a batch of rollouts (see ``rollout_batch``)."""
    n = max(1, len(trajs))
    n_completion = sum(len(r["env_mask"]) for r in rows)
    n_masked = sum(len(r["env_mask"]) - sum(r["env_mask"]) for r in rows)
    errors = sum(1 for t in trajs for s in t.steps
                 if s.execution is not None and not s.execution.ok
                 and s.fault not in INFRA_FAULTS)
    return {
        "tir/accuracy": sum(t.verdict == "correct" for t in trajs) / n,
        "tir/turns": sum(len(t.steps) for t in trajs) / n,
        "tir/code_cells": sum(len(t.code_cells) for t in trajs) / n,
        "tir/code_errors": errors / n,
        "tir/infra_faults": float(sum(e == INFRA for e in excluded)),
        "tir/void_turns": sum(is_void(s) for t in trajs for s in t.steps) / n,
        "tir/excluded": float(sum(e is not None for e in excluded)),
        "tir/masked_fraction": n_masked / max(1, n_completion),
        "tir/retokenised_turns": float(sum(r["retokenised"] for r in rows)),
        "tir/text_prompt_rollouts": float(sum(not token_faithful(t) for t in trajs)),
    }
