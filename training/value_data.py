"""Step-level value data from logged trajectories: step boundaries, Monte-Carlo targets, and the
contrastive and conservative examples of ``training.value``.

The state after step k of a trajectory is the problem plus its first k steps (model text, code
outputs and agent feedback included: the outputs are context the model read, never a label);
the value of that state is read at the step's *boundary*, the token that covers the last
character of step k in the rendered chat (``encode_steps``). The text is tokenised in pieces cut
at every step end (and wherever model and executor text meet, as ``training.masking`` does), so
no token straddles two steps: the tokens up to boundary k are the tokens of the trajectory cut
after step k, and a partial trajectory scored during search reads the same tokens the model was
trained on.

Monte-Carlo target (MCRL-style offline return; the same "share of correct completions" as
the soft estimate of Wang et al. 2024, "Math-Shepherd", computed here from logged samples
instead of fresh rollouts): the value of
"problem + steps[:k]" is the share of correct finishes among the logged trajectories of the same
problem that share exactly those k steps (``mc_targets``). Multi-sample collection with a
deterministic kernel makes shared prefixes common at small k; at the last step the target is the
trajectory's own verdict.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from tirforge.training.masking import render
from tirforge.training.truncation import keep_end, marker_ids
from tirforge.trajectories.messages import to_segments
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.transcript import render_step

StepKey = tuple[str, str | None, str | None]


def step_key(step: Step) -> StepKey:
    """What makes two steps the same state transition: text, executor output, feedback."""
    return (step.text, step.output, step.feedback)


# -- boundaries ------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A trajectory as the value model reads it."""

    input_ids: list[int]
    bounds: list[int | None]
    """Per step, the index in ``input_ids`` of its boundary token (None: cut by truncation)."""
    cut: int
    """Tokens removed by head + tail truncation (0: none)."""


def _tokenize(tokenizer, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a < b:
            enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(s + a, e + a) for s, e in enc["offset_mapping"]]
    return ids, offsets


def encode_steps(
    traj: Trajectory, tokenizer, max_length: int | None = None, chat_template: str | None = None
) -> Encoded:
    """Token ids of ``traj`` in the ``fenced`` chat layout and the boundary token of each step.

    Boundary k is the last token starting before the end of step k's rendered text (its text,
    ```output block and feedback). Longer than ``max_length``: the prompt head and the end are
    kept (``training.truncation.keep_end``) and boundaries in the cut middle become None; the
    last step's boundary always survives. Raises ValueError for a slow tokenizer, a trajectory
    without prompt messages or a chat template that edits content (``masking.render``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the value model needs a fast tokenizer (offset mappings)")
    rendered = render(to_segments(traj, "fenced"), tokenizer, chat_template)
    text, ends, at = rendered.text, [], rendered.prompt_end
    for s in traj.steps:
        at += len(render_step(s))
        ends.append(at)
    changes = {e for span in rendered.spans for e in span}
    cuts = sorted({0, len(text), *ends, *changes})
    ids, offsets = _tokenize(tokenizer, text, cuts)
    bounds: list[int | None] = []
    for end in ends:
        last = max((i for i, (s, _) in enumerate(offsets) if s < end), default=None)
        bounds.append(last)
    fitted = keep_end(ids, [0] * len(ids), rendered_prompt_tokens(offsets, rendered.prompt_end),
                      max_length, marker_ids(tokenizer))
    if fitted.cut == 0:
        return Encoded(fitted.input_ids, bounds, 0)
    head, n = fitted.prompt_length, len(ids)
    tail_start = head + fitted.cut  # first kept index of the tail in the uncut sequence
    shift = len(fitted.input_ids) - (n - tail_start)  # where the tail starts in the fitted ids

    def moved(p: int | None) -> int | None:
        if p is None or (head <= p < tail_start):
            return None
        return p if p < head else p - tail_start + shift

    return Encoded(fitted.input_ids, [moved(b) for b in bounds], fitted.cut)


def rendered_prompt_tokens(offsets: list[tuple[int, int]], prompt_end: int) -> int:
    """Tokens that end at or before the prompt's end (what ``keep_end`` keeps as the head)."""
    return sum(1 for _, e in offsets if e <= prompt_end)


# -- Monte-Carlo targets ---------------------------------------------------------------------------
def problem_key(t: Trajectory) -> str:
    return t.problem_id or t.problem


def mc_counts(trajs: list[Trajectory]) -> dict[str, list[tuple[int, int]]]:
    """Trajectory id -> (correct, total) after each of its steps: the graded trajectories of the
    same problem whose first k steps are exactly its first k steps (itself included), and how
    many of them finished correct. Ungraded trajectories (``verdict`` None) are left out.
    Raises ValueError for two trajectories with the same id."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    graded = [t for t in trajs if t.verdict is not None]
    ids = [t.id for t in graded]
    if len(set(ids)) != len(ids):
        raise ValueError("trajectory ids must be unique to attach targets to them")
    for t in graded:
        keys = tuple(step_key(s) for s in t.steps)
        for k in range(1, len(keys) + 1):
            c = counts[(problem_key(t), keys[:k])]
            c[0] += t.verdict == "correct"
            c[1] += 1
    out = {}
    for t in graded:
        keys = tuple(step_key(s) for s in t.steps)
        out[t.id] = [tuple(counts[(problem_key(t), keys[:k])]) for k in range(1, len(keys) + 1)]
    return out


def mc_targets(trajs: list[Trajectory]) -> dict[str, list[float]]:
    """Trajectory id -> the Monte-Carlo value after each of its steps: the share of correct
    verdicts among the graded trajectories of the same problem whose first k steps are exactly
    its first k steps (itself included; ``mc_counts``). Ungraded trajectories (``verdict``
    None) are left out. Raises ValueError for two trajectories with the same id."""
    return {i: [c / n for c, n in cs] for i, cs in mc_counts(trajs).items()}


def prefix_hash(traj: Trajectory, k: int) -> str:
    """Short stable hash of the state "problem + first ``k`` steps" of ``traj`` (the problem
    key and each step's ``step_key``): two trajectories that share the state share the hash."""
    blob = json.dumps([problem_key(traj), [step_key(s) for s in traj.steps[:k]]],
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def first_divergence(a: Trajectory, b: Trajectory) -> int | None:
    """Index of the first step where ``a`` and ``b`` differ, when both have that step (so the
    two are different next steps from one shared prefix); None otherwise."""
    for i, (x, y) in enumerate(zip(a.steps, b.steps, strict=False)):
        if step_key(x) != step_key(y):
            return i
    return None


# -- unsupported steps (conservative term) ---------------------------------------------------------
_NUMBER = re.compile(r"\d+")


def perturb(step: Step, rng: random.Random) -> Step | None:
    """The step with every number in its text and output shifted by 1..9 (a plausible-looking
    step the data never took), or None when its text holds no number."""
    if not _NUMBER.search(step.text):
        return None
    shift = rng.randint(1, 9)

    def sub(s: str | None) -> str | None:
        return None if s is None else _NUMBER.sub(lambda m: str(int(m.group()) + shift), s)

    code = sub(step.code)
    return Step(text=sub(step.text) or "", code=code, output=sub(step.output),
                feedback=step.feedback)


def unsupported_step(
    traj: Trajectory, i: int, others: list[Trajectory], seen: set[StepKey], source: str,
    rng: random.Random,
) -> Step | None:
    """A step to put at position ``i`` of ``traj`` that no logged trajectory of its problem took
    after ``traj.steps[:i]`` (``seen``): a step of another problem (``others``) or a perturbed
    copy of ``traj.steps[i]``, as ``source`` says (``both``: either, at random)."""
    kinds = {"other-problem": ["other"], "perturbed": ["perturbed"],
             "both": rng.sample(["other", "perturbed"], 2)}[source]
    for kind in kinds:
        cand = None
        if kind == "perturbed":
            cand = perturb(traj.steps[i], rng)
        elif others:
            donor = rng.choice(others)
            if donor.steps:
                cand = rng.choice(donor.steps)
        if cand is not None and step_key(cand) not in seen:
            return cand
    return None
