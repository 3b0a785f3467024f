import dataclasses
import random

import pytest
import torch

from tirforge.training.grpo import (
    GRPOTrainConfig,
    load_problems,
    make_trainer,
    rollout_example,
    verifier_reward,
)
from tirforge.training.masking import IGNORE_INDEX, tokenize_trajectory
from tirforge.trajectories.schema import Step, Trajectory

from .training_utils import tiny_model_dir, tokenizer

PROMPT = [{"role": "system", "content": "Solve with Python."}, {"role": "user", "content": "2+3?"}]


def tiny_policy_rollout(seed=0):
    """A two-turn rollout: the live policy writes a few tokens of prose, a fixed code cell runs and
    its output comes back, then a random (sometimes right) boxed answer: rewards vary per group."""
    rng = random.Random(seed)

    def rollout(prompts, model, tok):
        out = []
        for messages in prompts:
            enc = tok.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            gen = model.generate(
                **enc, max_new_tokens=6, do_sample=True, pad_token_id=tok.pad_token_id
            )
            prose = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            answer = str(rng.choice([5, 6]))
            out.append(Trajectory(
                problem=messages[-1]["content"], messages=messages,
                steps=[
                    Step(text=prose + "\n```python\nprint(2 + 3)\n```", code="print(2 + 3)",
                         output="OUTPUT_TOKENS_HERE"),
                    Step(text=f"So \\boxed{{{answer}}}."),
                ],
                final_answer=answer,
            ))
        return out

    return rollout


def _cfg(tmp_path, **kw):
    base = dict(
        model=tiny_model_dir(tmp_path),
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=128,
        logging_steps=1,
        save_steps=100,
        report_to=["none"],
    )
    return GRPOTrainConfig(**{**base, **kw})


def test_rollout_example_masks_outputs():
    tok = tokenizer()
    t = Trajectory(problem="p", messages=PROMPT, steps=[
        Step(text="Run it.\n```python\nprint(1)\n```", code="print(1)", output="SECRET"),
        Step(text="\\boxed{1}"),
        Step(text="```python\nx\n```", code="x", output="TAIL"),  # ends on an output
    ])
    cfg = GRPOTrainConfig(max_completion_length=1000)
    ex = rollout_example(t, tok, cfg)
    full = tokenize_trajectory(t, tok, "fenced")
    n = len(ex["prompt_ids"])
    m = len(ex["completion_ids"])
    assert ex["prompt_ids"] + ex["completion_ids"] == full["input_ids"][: n + m]
    scored = tok.decode([i for i, k in zip(ex["completion_ids"], ex["env_mask"], strict=True) if k])
    assert scored == "Run it.\n```python\nprint(1)\n```\\boxed{1}```python\nx\n```"
    completion = tok.decode(ex["completion_ids"])
    assert "SECRET" in completion and "TAIL" not in completion
    assert ex["env_mask"] == [int(lab != IGNORE_INDEX) for lab in full["labels"][n : n + m]]


def test_verifier_reward_and_problem_loading(tmp_path):
    trajs = [Trajectory(problem="p", final_answer=a) for a in ("5", "6", None)]
    assert verifier_reward(None, ["5"] * 3, trajs) == [1.0, 0.0, 0.0]
    path = tmp_path / "problems.jsonl"
    path.write_text('{"problem": "2+3?", "answer": 5}\n{"problem": "2+3?", "answer": 5}\n')
    rows = load_problems(path, make_prompt=lambda p: [{"role": "user", "content": p}])
    assert rows == [
        {"prompt": [{"role": "user", "content": "2+3?"}], "problem": "2+3?", "reference": "5"}
    ]
    with pytest.raises(ValueError, match="no prompt messages"):
        load_problems(path)
    path.write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match="reference"):
        load_problems(path)


def test_grpo_steps_with_masked_tool_outputs(tmp_path):
    cfg = _cfg(tmp_path)
    problems = [{"prompt": PROMPT, "reference": "5"}] * 4
    trainer = make_trainer(cfg, tiny_policy_rollout(), problems)
    tok = trainer.processing_class
    # One generation step through TRL: our env_mask is its tool_mask, outputs are masked.
    trainer.model.train()
    inputs = [{"prompt": PROMPT, "reference": "5"} for _ in range(4)]
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions(inputs)
    loss_mask = (batch["completion_mask"] * batch["tool_mask"]).bool()
    scored = tok.decode(batch["completion_ids"][loss_mask])
    assert "OUTPUT_TOKENS_HERE" not in scored and "```output" not in scored
    assert "OUTPUT_TOKENS_HERE" in tok.decode(batch["completion_ids"][0])
    # Gradient check: the final hidden state at position p only feeds the prediction of token
    # p+1, so its gradient is nonzero exactly where the next completion token is scored.
    hidden = {}

    def keep(module, args, out):
        out.retain_grad()
        hidden["h"] = out

    hook = trainer.model.model.norm.register_forward_hook(keep)
    try:
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    finally:
        hook.remove()
    p = batch["prompt_ids"].shape[1]
    g = hidden["h"].grad[:, p - 1 : -1].abs().sum(-1) > 0
    rows = batch["advantages"] != 0  # the seeded rollout mixes right and wrong answers
    assert rows.any()
    assert torch.equal(g[rows], loss_mask[rows])
    trainer.model.zero_grad()
    # And two training steps change the weights (the seeded rollouts give mixed rewards).
    before = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
    trainer.train()
    changed = sum(not torch.equal(before[n], q) for n, q in trainer.model.named_parameters())
    assert changed > 0
    assert any("reward" in h for h in trainer.state.log_history)


def test_agent_rollouts_run_the_kernel_in_the_loop(tmp_path):
    """GRPO with the agent graph and a real sandboxed kernel; turns are scripted (a random tiny
    model would never write a code block), the policy being trained is the tiny model."""
    from tirforge.agent.backends.replay import ReplayBackend
    from tirforge.agent.graph import AgentConfig
    from tirforge.agent.pipelines.rollout import agent_rollout
    from tirforge.executors import ExecutorConfig, make_executor

    agent_cfg = AgentConfig(max_turns=3)
    problem = "What is 6 times 7?"
    prompt = agent_cfg.fmt.build_messages(problem, hint=agent_cfg.tool_hint)
    code = 'print("KERNEL" + "_SAYS", 6 * 7)'
    turns = [[f"Compute.\n```python\n{code}\n```", f"\\boxed{{{a}}}"] for a in [42, 41] * 4]
    scripts = iter(turns)

    def scripted(model, tok):
        return ReplayBackend(next(scripts))

    def rollout(prompts, model, tok):  # a fresh script per prompt
        out = []
        for p in prompts:
            out += agent_rollout(agent_cfg, kernel, {_key(p): problem}, scripted)([p], model, tok)
        seen.extend(out)
        return out

    seen: list = []
    cfg = _cfg(tmp_path, max_steps=1)
    kernel = make_executor(ExecutorConfig(backend="local", sandbox="auto", timeout=10.0))
    kernel.start()
    with kernel:
        trainer = make_trainer(cfg, rollout, [{"prompt": prompt, "problem": problem,
                                               "reference": "42"}] * 4)
        trainer.train()
    assert len(seen) == 4
    assert all(t.steps[0].output.strip() == "KERNEL_SAYS 42" for t in seen)  # the kernel ran it
    assert sorted(t.final_answer for t in seen) == ["41", "41", "42", "42"]
    rewards = [h for h in trainer.state.log_history if "reward" in h]
    assert rewards and rewards[0]["reward"] == 0.5
    assert rewards[0]["tir/code_cells"] == 1.0 and rewards[0]["tir/infra_faults"] == 0.0
    ex = rollout_example(seen[0], trainer.processing_class, cfg)
    scored = trainer.processing_class.decode(
        [i for i, k in zip(ex["completion_ids"], ex["env_mask"], strict=True) if k]
    )
    assert "KERNEL_SAYS" not in scored and '"KERNEL" + "_SAYS"' in scored


def _key(messages):
    import json

    return json.dumps(messages, sort_keys=True)


def test_cli_train_grpo_runs_the_agent_with_the_live_policy(tmp_path):
    """`tirforge train grpo` end to end: problems file, agent prompts, the live-policy backend,
    a sandboxed kernel. The random tiny model writes no code, so rewards are 0: a wiring test."""
    import json

    from typer.testing import CliRunner

    from tirforge.apps.cli import app

    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    args = ["train", "grpo", "-c", "configs/grpo_cpu_tiny.yaml", "--problems", str(problems),
            "--model", tiny_model_dir(tmp_path), "--output-dir", str(tmp_path / "cli"),
            "--max-steps", "1", "--max-turns", "1", "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def _spelled(tok, text):  # valid ids for text, one per character: not what encode() gives
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


def _faulted(result):
    """``result`` marked as an infrastructure fault: the kernel died without hitting a limit."""
    return dataclasses.replace(result, fault="kernel_died") if dataclasses.is_dataclass(
        result) else result.model_copy(update={"fault": "kernel_died"})


def test_faults_and_void_turns_get_no_reward_and_no_gradient(tmp_path):
    """Through TRL itself: the trainer receives the sampled ids verbatim (with their
    logprobs); an infra-faulted and a void-turn rollout are out of the group statistics (the
    two others' advantages are symmetric), have advantage 0 and no scored token; the step's
    tir/* statistics are logged."""
    from tirforge.executors.result import ExecutionResult

    code = "print(6 * 7)"
    turn = f"Go.\n```python\n{code}\n```"

    def traj(answer, result=None, void=False):
        steps = [Step(text=turn, code=code, output="42",
                      execution=result or ExecutionResult(stdout="42\n"))]
        if void:
            steps.append(Step(text="Hmm, let me think.", feedback=" Please answer."))
        steps.append(Step(text=f"\\boxed{{{answer}}}"))
        return Trajectory(problem="p", messages=PROMPT, steps=steps, final_answer=str(answer))

    def rollout(prompts, model, tok):
        out = [traj(42), traj(41), traj(42, _faulted(ExecutionResult(error_name="KernelDied"))),
               traj(42, void=True)]
        for t in out:
            for s in t.steps:
                s.token_ids = _spelled(tok, s.text) + [tok.eos_token_id] * (s.code is None)
                s.logprobs = [-0.5] * len(s.token_ids)
        return out

    cfg = _cfg(tmp_path, filter_void_turns=True, check_prefix_property=True)
    trainer = make_trainer(cfg, rollout, [{"prompt": PROMPT, "reference": "42"}] * 4)
    tok = trainer.processing_class
    trainer.model.train()
    batch = trainer._generate_and_score_completions(
        [{"prompt": PROMPT, "reference": "42"} for _ in range(4)])
    scored = batch["completion_mask"] * batch["tool_mask"]
    row0 = batch["completion_ids"][0][scored[0].bool()].tolist()
    want = _spelled(tok, turn) + _spelled(tok, "\\boxed{42}") + [tok.eos_token_id]
    assert row0 == want and tok(tok.decode(want), add_special_tokens=False)["input_ids"] != want
    lps = batch["sampling_per_token_logps"][0][scored[0].bool()]
    assert torch.allclose(lps, torch.full_like(lps, -0.5))
    adv = batch["advantages"]
    assert adv[0] > 0 and torch.isclose(adv[0], -adv[1]) and adv[2] == 0 and adv[3] == 0
    assert scored[2].sum() == 0 and scored[3].sum() == 0 and scored[1].sum() > 0
    m = trainer._metrics["train"]
    assert m["tir/infra_faults"] == [1.0] and m["tir/excluded"] == [2.0]
    assert m["tir/void_turns"] == [0.25] and m["tir/code_cells"] == [1.0]
    assert m["tir/retokenised_turns"] == [0.0] and 0 < m["tir/masked_fraction"][0] < 1
    # Without the filter the void-turn rollout is scored like any other.
    out, stats = rollout_batch_of(rollout([PROMPT] * 4, None, tok), tok)
    assert out["excluded"] == [None, None, "infra", None] and stats["tir/excluded"] == 1.0


def rollout_batch_of(trajs, tok):
    from tirforge.training.rollout_batch import rollout_batch

    return rollout_batch(trajs, tok, 128, filter_void_turns=False)
