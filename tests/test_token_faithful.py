"""Token in, token out: the trainer receives exactly the ids the policy sampled, and each turn's
prompt extends the previous one (the prefix property), on every format and on the SmolLM2 and
Qwen2.5 chat templates. The scripted backend samples *non-canonical* ids (one token per
character), so decoding and re-encoding them gives different ids."""

from __future__ import annotations

import pytest

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.agent.graph import AgentConfig
from tirforge.agent.pipelines.rollout import agent_rollout, prompt_key
from tirforge.agent.runner import RunnerConfig
from tirforge.executors import ExecutorConfig
from tirforge.executors.pool import KernelPool
from tirforge.training.rollout_batch import rollout_batch, rollout_example
from tirforge.trajectories.schema import Step, Trajectory
from tirforge.trajectories.tokens import (
    encode,
    prefix_violations,
    prompt_ids,
    token_stream,
    turn_ids,
)

from .training_utils import tokenizer


def spelled(tok, text: str) -> list[int]:
    """``text`` as one token per character: valid ids that decode to ``text`` but are not what
    the tokenizer would produce."""
    return [i for ch in text for i in encode(tok, ch)]


class SpellingBackend:
    """Plays a script per trajectory tag and 'samples' its turns as spelled ids, with made-up
    log-probabilities; records every request and the ids a token-in engine would feed."""

    name = "spelling"

    def __init__(self, tok, script: list[str]):
        self.tok, self.script = tok, script
        self.left: dict[str, list[str]] = {}
        self.fed: dict[str, list[list[int]]] = {}
        self.batch_sizes: list[int] = []

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        self.batch_sizes.append(len(requests))
        out = []
        for r in requests:
            turns = self.left.setdefault(r.tag, list(self.script))
            self.fed.setdefault(r.tag, []).append(
                prompt_ids(r.messages, r.pieces, r.prefix, self.tok))
            text = turns.pop(0)
            ids = spelled(self.tok, text)
            reason = "stop" if r.stop is not None and r.stop(text) else "eos"
            if reason == "eos":
                ids.append(self.tok.eos_token_id)
            out.append(Completion(text=text, finish_reason=reason, n_tokens=len(ids),
                                  token_ids=ids, logprobs=[-0.25] * len(ids)))
        return out


SCRIPTS = {
    # the first turn goes on past its closing fence: the turn is cut there, ids too
    "qwen-tir": ["Compute.\n```python\nprint(6 * 7)\n```\nand then some", "So \\boxed{42}."],
    # a decomposition plan (after the agent's lead-in, cut at the blank line), then code
    "dotamath": ["1. Multiply.\n\n2. Done", "```python\nx = 6 * 7\nprint(x)\n```",
                 "\\boxed{42}"],
    "qwen-cot": ["6 times 7 is forty-two", "42}"],  # no answer -> nudge -> answer
}


@pytest.fixture(scope="module")
def pool():
    with KernelPool(ExecutorConfig(backend="local", sandbox="auto", timeout=10.0), size=2) as p:
        yield p


@pytest.mark.parametrize("template", ["smollm", "qwen"])
@pytest.mark.parametrize("fmt", ["qwen-tir", "dotamath", "qwen-cot"])
def test_prefix_property_and_sampled_ids_reach_the_trainer(pool, fmt, template):
    tok = tokenizer(template)
    cfg = AgentConfig(format=fmt, max_turns=3)
    problem = "What is 6 times 7?"
    prompt = cfg.fmt.build_messages(problem, hint=cfg.tool_hint)
    backend = SpellingBackend(tok, SCRIPTS[fmt])
    rollout = agent_rollout(cfg, pool, {prompt_key(prompt): {"problem": problem,
                                                             "reference": "42"}},
                            backend_factory=lambda m, t: backend)
    (traj,) = rollout([prompt], None, tok)
    assert traj.final_answer == "42" and traj.verdict == "correct"
    assert len(traj.steps) == len(SCRIPTS[fmt]) and all(s.token_ids for s in traj.steps)
    if fmt != "qwen-cot":
        assert [s.output for s in traj.steps if s.code][0].strip() == "42"  # the kernel ran it
    # The case the check exists for: decode -> encode does not give the sampled ids back.
    sampled = [turn_ids(tok, s.text[s.sampled_from:], s.token_ids) for s in traj.steps]
    assert encode(tok, tok.decode(sampled[0])) != sampled[0]
    # A turn cut (at its closing fence, at the plan's end) keeps the ids up to its last
    # character, no more.
    for s, ids in zip(traj.steps, sampled, strict=True):
        assert tok.decode(ids, skip_special_tokens=True) == s.text[s.sampled_from:]
    if fmt in ("qwen-tir", "dotamath"):
        assert len(sampled[0]) < len(traj.steps[0].token_ids)
    # Prefix property: what the engine was fed for turn k+1 begins with turn k's prompt + ids.
    (fed,) = backend.fed.values()
    assert len(fed) == len(traj.steps)
    for k in range(len(fed) - 1):
        assert fed[k + 1][: len(fed[k]) + len(sampled[k])] == fed[k] + sampled[k]
    assert prefix_violations(traj, tok) == []
    # ... and the trainer gets that same stream: each turn's prompt, sampled ids verbatim.
    ex = rollout_example(traj, tok, 10_000)
    full = ex["prompt_ids"] + ex["completion_ids"]
    for k in range(len(fed)):
        assert full[: len(fed[k]) + len(sampled[k])] == fed[k] + sampled[k]
    got = [i for i, m in zip(ex["completion_ids"], ex["env_mask"], strict=True) if m]
    assert got == [i for ids in sampled for i in ids]
    assert [lp for lp, m in zip(ex["logprobs"], ex["env_mask"], strict=True) if m] == \
        [-0.25] * len(got)
    assert all(lp is None for lp, m in zip(ex["logprobs"], ex["env_mask"], strict=True) if not m)


def test_text_prompts_break_the_prefix_property():
    """The check has teeth: a backend that re-tokenises the transcript text (no token in) feeds
    ids that do not extend the sampled ones."""
    tok = tokenizer()
    text = "Compute.\n```python\nprint(6 * 7)\n```"
    traj = Trajectory(problem="p", messages=[{"role": "user", "content": "6*7?"}], steps=[
        Step(text=text, code="print(6 * 7)", output="42", token_ids=spelled(tok, text)),
        Step(text="\\boxed{42}", token_ids=spelled(tok, "\\boxed{42}")),
    ])
    assert prefix_violations(traj, tok) == []
    assert prefix_violations(traj, tok, token_in=False) == [0]


def test_turn_ids_cut_at_the_closing_token():
    tok = tokenizer()
    full = "Go.\n```python\nx = 1\n```\nextra words after"
    text = full[: full.index("```\n", 10) + 3]
    ids = encode(tok, full)
    kept = turn_ids(tok, text, ids)
    assert tok.decode(kept).startswith(text) and len(kept) < len(ids)
    assert not tok.decode(kept[:-1]).startswith(text)  # the last kept token closed the fence
    eos = [*encode(tok, "\\boxed{1}"), tok.eos_token_id]  # a turn the model ended keeps its EOS
    assert turn_ids(tok, "\\boxed{1}", eos) == eos


def test_batch_without_ids_falls_back_and_counts_it():
    tok = tokenizer()
    traj = Trajectory(problem="p", messages=[{"role": "user", "content": "q"}],
                      steps=[Step(text="\\boxed{1}")])
    out, stats = rollout_batch([traj], tok, 100)
    assert stats["tir/retokenised_turns"] == 1 and out["logprobs"] is None
    assert token_stream(traj.messages, traj.steps, tok).retokenised == [0]


def test_concurrent_rollouts_share_model_calls(pool):
    tok = tokenizer()
    cfg = AgentConfig(max_turns=3)
    problems = [f"What is {a} times 7?" for a in (6, 5, 4, 3)]
    prompts = [cfg.fmt.build_messages(p, hint=cfg.tool_hint) for p in problems]
    backend = SpellingBackend(tok, SCRIPTS["qwen-tir"])
    rollout = agent_rollout(cfg, pool, {prompt_key(m): p for m, p in zip(prompts, problems,
                                                                          strict=True)},
                            backend_factory=lambda m, t: backend,
                            runner_cfg=RunnerConfig(max_concurrency=4))
    trajs = rollout(prompts, None, tok)
    assert [t.problem for t in trajs] == problems  # order kept
    assert all(t.steps[0].output.strip() == "42" for t in trajs)
    assert max(backend.batch_sizes) > 1  # model calls of different rollouts were batched


def test_a_rollout_that_raises_is_an_infra_fault_not_a_zero_reward(pool):
    tok = tokenizer()
    cfg = AgentConfig(max_turns=2)
    problems = ["What is 6 times 7?", "BROKEN: what is 5 times 7?"]
    prompts = [cfg.fmt.build_messages(p, hint=cfg.tool_hint) for p in problems]
    inner = SpellingBackend(tok, SCRIPTS["qwen-tir"])

    class Flaky:
        name = "flaky"

        def generate(self, requests, params):
            if any("BROKEN" in r.messages[-1]["content"] for r in requests):
                raise ConnectionError("engine died")
            return inner.generate(requests, params)

    rollout = agent_rollout(cfg, pool, {prompt_key(m): p for m, p in zip(prompts, problems,
                                                                          strict=True)},
                            backend_factory=lambda m, t: Flaky(),
                            runner_cfg=RunnerConfig(max_concurrency=2, max_batch=1))
    trajs = rollout(prompts, None, tok)
    assert trajs[0].final_answer == "42" and trajs[1].stop_reason == "error"
    assert "ConnectionError" in trajs[1].sampling["error"]
    out, stats = rollout_batch(trajs, tok, 1000)
    assert out["excluded"] == [None, "infra"] and stats["tir/infra_faults"] == 1.0
    assert sum(out["env_mask"][1]) == 0 and sum(out["env_mask"][0]) > 0
