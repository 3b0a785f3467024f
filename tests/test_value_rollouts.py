"""Value targets from K fresh rollouts per step prefix (``train value --rollouts K``): targets
from scripted continuations with known outcomes on real kernels, the prefix's kernel state
restored (replay, and fork where the executor has it), resume from the cache, the CLI end to
end on a tiny random policy, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.graph import AgentConfig, solve
from tirforge.agent.pipelines.value_targets import (
    RolloutSettings,
    continuation_config,
    prefix_state,
    rollout_targets,
)
from tirforge.executors import ExecutorConfig, make_executor
from tirforge.executors.pool import KernelPool
from tirforge.training.value import ValueTrainConfig
from tirforge.training.value_data import mc_targets, prefix_hash
from tirforge.training.value_rollouts import (
    RolloutCache,
    combine_targets,
    select_prefixes,
)
from tirforge.trajectories.schema import Step, Trajectory, append_jsonl

from .training_utils import tiny_model_dir

SET = "Set x.\n```python\nx = 6 * 7\nprint(x)\n```"
SHOW = "Show x.\n```python\nprint('x is', x)\n```"
RIGHT, WRONG = "So \\boxed{42}.", "So \\boxed{13}."
EXEC = ExecutorConfig(backend="local", timeout=10)


@pytest.fixture(scope="module")
def kernel():
    k = make_executor(EXEC)
    k.start()
    yield k
    k.close()


def logged(kernel, pid: str, turns: list[str], reference: str | None = "42") -> Trajectory:
    """A trajectory as ``collect`` logs it: the real loop on a real kernel, graded."""
    kernel.reset()
    t = solve(f"Problem {pid}: what is 6 * 7?", ReplayBackend(turns), kernel,
              AgentConfig(max_turns=4), reference=reference)
    return t.model_copy(update={"problem_id": pid})


def run(trajs, script, cache, k=3, fork=False, settings_turns=3, **kw):
    """Rollout targets with a replay policy on a pool of real kernels; also the continuations."""
    factory = (lambda c: Forking(make_executor(c))) if fork else (
        lambda c: NoFork(make_executor(c)))
    seen: dict[tuple[int, int], Trajectory] = {}
    backend = ReplayBackend(script)
    with KernelPool(EXEC, size=2, spare=0, factory=factory) as pool:
        records, rep = rollout_targets(
            trajs, backend, pool,
            RolloutSettings(k=k, max_turns=settings_turns, concurrency=2), str(cache),
            on_rollout=lambda p, j, t: seen.__setitem__((p.k, j), t), **kw)
    return records, rep, seen, backend


def test_targets_are_the_share_correct_among_k_continuations(kernel, tmp_path):
    good = logged(kernel, "p", [SET, RIGHT])
    bad = logged(kernel, "p", [SET, WRONG])
    assert (good.verdict, bad.verdict) == ("correct", "incorrect")
    # One state to roll out from (the shared first step); the continuations' outcomes are
    # scripted: 2 of 3 right. Continuation 0 prints x, which only the prefix's cell defined.
    script = {"p:1#0": [SHOW, RIGHT], "p:1#1": [WRONG], "p:1#2": [RIGHT]}
    records, rep, seen, backend = run([good, bad], script, tmp_path / "c.jsonl")
    assert (rep.prefixes, rep.ran, rep.cached, rep.failed, rep.rollouts) == (1, 1, 0, [], 3)
    (rec,) = records.values()
    assert (rec.correct, rec.k, rec.verdicts, rec.steps) == (
        2, 3, ["correct", "incorrect", "correct"], 1)
    assert rec.prefix == prefix_hash(good, 1) == prefix_hash(bad, 1) and not rec.forked
    # The kernel state was restored before continuing: x is 42 in the continuation's kernel.
    show = seen[(1, 0)].steps[1]
    assert show.code is not None and show.execution.ok and "x is 42" in show.output
    assert seen[(1, 0)].steps[0].text == good.steps[0].text  # it starts from the prefix
    # K continuations, each replayed the prefix's one cell into a reset kernel.
    assert rec.replayed_cells == 3
    # The model was asked to continue the prefix, not to start over.
    assert all(c.prefix.startswith(SET) for c in backend.calls)
    # Targets: rollouts alone, or pooled with the two logged finishes from that state.
    only = combine_targets([good, bad], records, "rollouts")
    pooled = combine_targets([good, bad], records, "pool")
    assert only[good.id] == pytest.approx([2 / 3, 1.0]) and only[bad.id][1] == 0.0
    assert pooled[good.id] == pytest.approx([(2 + 1) / (3 + 2), 1.0])
    assert mc_targets([good, bad])[good.id] == [0.5, 1.0]  # what logged data alone says


class Forking:
    """A real kernel whose real ``fork()`` (issue 24) is counted, and each fork's close seen."""

    supports_fork = True
    forks: list[Forking] = []

    def __init__(self, inner):
        self.inner, self.closed = inner, False

    def fork(self):
        kid = Forking(self.inner.fork())
        Forking.forks.append(kid)
        return kid

    def close(self):
        self.closed = True
        self.inner.close()

    def __getattr__(self, name):  # run, reset, start, restart, interrupt, is_alive, config
        return getattr(self.inner, name)


class NoFork:
    """A real kernel that says it cannot fork: the replay path."""

    supports_fork = False

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_fork_path_runs_the_prefix_once_and_continues_on_forks(kernel, tmp_path):
    two = logged(kernel, "f", [SET, SHOW, RIGHT])  # prefixes of 1 and 2 steps
    Forking.forks.clear()
    script = {f"f:{k}#{j}": [SHOW, RIGHT] for k in (1, 2) for j in range(2)}
    records, rep, seen, _ = run([two], script, tmp_path / "c.jsonl", k=2, fork=True)
    assert rep.ran == 2 and rep.forked == 2 and len(Forking.forks) == 4
    assert all(f.closed for f in Forking.forks)  # every fork is closed after its rollout
    by_k = {r.steps: r for r in records.values()}
    # The parent replays the prefix's cells once; the K forks replay nothing themselves.
    assert by_k[1].replayed_cells == 1 and by_k[2].replayed_cells == 2
    assert all(r.forked and r.correct == 2 for r in records.values())
    for (k, _j), t in seen.items():
        assert len(t.steps) == k + 2 and "x is 42" in t.steps[k].output


def test_resume_does_not_redo_finished_prefixes(kernel, tmp_path):
    a = logged(kernel, "a", [SET, RIGHT])
    b = logged(kernel, "b", [SET, WRONG])
    cache = tmp_path / "c.jsonl"
    # A run whose model fails: every prefix is reported failed, nothing is cached.
    _, rep, _, _ = run([a, b], {}, cache, k=2)
    assert rep.ran == 0 and sorted(f[:4] for f in rep.failed) == ["a:1:", "b:1:"]
    assert RolloutCache(cache).read() == {}
    # A run killed after finishing a's prefix (modelled as a run over a alone)...
    _, rep, _, _ = run([a], {"a:1#0": [RIGHT], "a:1#1": [WRONG]}, cache, k=2)
    assert rep.ran == 1 and not rep.failed
    with cache.open("ab") as f:
        f.write(b'{"problem": "b", "pref')  # and a torn line from a kill -9 mid-write
    # Second run: only b is rolled out; a comes from the cache, untouched.
    records, rep, _, backend = run([a, b], {"b:1#0": [RIGHT], "b:1#1": [RIGHT]}, cache, k=2)
    assert (rep.cached, rep.ran, rep.failed) == (1, 1, [])
    assert {c.tag.split("#")[0] for c in backend.calls} == {"b:1"}
    got = {r.problem: r.correct for r in records.values()}
    assert got == {"a": 1, "b": 2}
    assert len(RolloutCache(cache).read()) == 2
    # Another K is another estimate: nothing reused.
    _, rep, _, _ = run([a], {"a:1#0": [RIGHT]}, cache, k=1)
    assert (rep.cached, rep.ran) == (0, 1)
    # One writer at a time.
    with RolloutCache(cache), pytest.raises(RuntimeError, match="another run"):
        RolloutCache(cache).open()


def test_prefix_selection_and_state():
    s = [Step(text=f"s{i}") for i in range(4)]
    t1 = Trajectory(problem="p", problem_id="p", steps=s[:3], verdict="correct",
                    messages=[{"role": "user", "content": "p"}])
    t2 = Trajectory(problem="p", problem_id="p", steps=[s[0], s[3]], verdict="incorrect",
                    messages=[{"role": "user", "content": "p"}])
    t3 = t1.model_copy(update={"id": "x", "verdict": None})  # ungraded: no targets, no rollouts
    got = select_prefixes([t1, t2, t3])
    assert sorted(p.k for p in got) == [1, 2]  # s0 shared once; s0+s1; finished states never
    assert len(select_prefixes([t1, t2], max_per_problem=1)) == 1
    with pytest.raises(ValueError, match=">= 0"):
        select_prefixes([t1], max_per_problem=-1)
    # The state after a nudge and a reflection keeps both counts.
    cfg = AgentConfig()
    fb = cfg.fmt.feedback
    steps = [Step(text="a", feedback=fb["error"]), Step(text="b", feedback=fb["no_answer"]),
             Step(text="c")]
    st = prefix_state(t1.model_copy(update={"steps": steps}), 2, cfg)
    assert (st["turns"], st["nudged"], st["reflections"], len(st["steps"])) == (2, True, 1, 2)
    conf = continuation_config(t1, 2, RolloutSettings(k=1, max_turns=3))
    assert (conf.max_turns, conf.decomposes) == (5, False)
    with pytest.raises(ValueError, match="finished state"):
        prefix_state(t1, 3, cfg)


def test_bad_input_is_a_clear_error(kernel, tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        RolloutSettings(k=0)
    with pytest.raises(ValueError, match="rollouts must be >= 1"):
        ValueTrainConfig(rollouts=-1)
    with pytest.raises(ValueError, match="rollout_max_turns"):
        ValueTrainConfig(rollouts=2, rollout_max_turns=0)
    with pytest.raises(ValueError, match="rollout_mix"):
        combine_targets([], {}, "mean")  # type: ignore[arg-type]
    unref = logged(kernel, "u", [SET, RIGHT], reference=None)
    unref = unref.model_copy(update={"verdict": "correct"})  # graded elsewhere, no reference
    with pytest.raises(ValueError, match="no reference"):
        run([unref], {}, tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists() or not RolloutCache(tmp_path / "c.jsonl").read()
    from tirforge.apps.cli import app

    data = tmp_path / "t.jsonl"
    append_jsonl(data, [unref])
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["train", "value", "--model", str(model), "--train-file",
                                 str(data), "--rollouts", "2", "--output-dir",
                                 str(tmp_path / "out")])
    assert r.exit_code == 2 and "no reference" in r.output
    r = CliRunner().invoke(app, ["train", "value", "--model", str(model), "--train-file",
                                 str(data), "--rollouts", "-1"])
    assert r.exit_code == 2 and "rollouts must be >= 1" in r.output


def test_cli_rollouts_end_to_end_on_a_tiny_policy(kernel, tmp_path):
    from tirforge.apps.cli import app

    a = logged(kernel, "a", [SET, RIGHT])
    b = logged(kernel, "a", [SET, WRONG])
    c = logged(kernel, "c", [SET, SHOW, RIGHT])
    data = tmp_path / "t.jsonl"
    append_jsonl(data, [a, b, c])
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "value"
    args = ["train", "value", "--model", model, "--train-file", str(data), "--output-dir",
            str(out), "--rollouts", "2", "--rollout-max-turns", "1", "--rollout-max-new-tokens",
            "8", "--rollout-concurrency", "1", "--max-steps", "2", "--save-steps", "1000",
            "--max-length", "512"]
    wide = {"COLUMNS": "400"}  # one log line per message
    r = CliRunner().invoke(app, args, env=wide)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and "saved" in r.output
    assert "rollout targets: 3 prefixes (0 cached, 3 rolled out x2" in r.output
    cache = [json.loads(x) for x in (out / "rollout_targets.jsonl").read_text().splitlines()]
    assert len(cache) == 3 and all(x["k"] == 2 and len(x["verdicts"]) == 2 for x in cache)
    # The random policy never answers 42: every rollout is graded, none correct.
    assert all(v is not None for x in cache for v in x["verdicts"])
    assert sum(x["correct"] for x in cache) == 0
    # Run again: everything comes from the cache.
    r = CliRunner().invoke(app, args, env=wide)
    assert r.exit_code == 0, r.output
    assert "3 cached, 0 rolled out" in r.output


def test_value_targets_module_layering():
    # training consumes rollout targets but never imports the agent.
    for name in ("value.py", "value_data.py", "value_rollouts.py"):
        text = (Path(__file__).parents[1] / "training" / name).read_text()
        assert "tirforge.agent" not in text, name


def test_train_value_hands_the_mixed_targets_to_the_trainer(kernel, tmp_path, monkeypatch):
    from tirforge.agent.pipelines.value_targets import train_value

    good = logged(kernel, "p", [SET, RIGHT])
    bad = logged(kernel, "p", [SET, WRONG])
    data = tmp_path / "t.jsonl"
    append_jsonl(data, [good, bad])
    seen: list = []
    monkeypatch.setattr("tirforge.training.value.train",
                        lambda cfg, targets=None: seen.append(targets) or cfg.output_dir)
    script = {"p:1#0": [SHOW, RIGHT], "p:1#1": [RIGHT], "p:1#2": [RIGHT], "p:1#3": [WRONG]}
    for mix, want in (("pool", (3 + 1) / (4 + 2)), ("rollouts", 3 / 4)):
        cfg = ValueTrainConfig(model="unused", train_file=str(data), rollouts=4,
                               rollout_mix=mix, rollout_concurrency=1,
                               output_dir=str(tmp_path / "out"))
        train_value(cfg, backend=ReplayBackend(script))
        assert seen[-1][good.id] == pytest.approx([want, 1.0])
        assert seen[-1][bad.id] == pytest.approx([want, 0.0])
    # The second run found the prefix in the cache (same K and settings): one record in all.
    assert len(RolloutCache(tmp_path / "out" / "rollout_targets.jsonl").read()) == 1


CHILD = """
import sys, time
from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.pipelines.value_targets import RolloutSettings, rollout_targets
from tirforge.executors import ExecutorConfig
from tirforge.executors.pool import KernelPool
from tirforge.trajectories.schema import read_jsonl

class Stuck(ReplayBackend):  # b's continuations hang: the run is killed while they do
    def generate(self, requests, params):
        if any(r.tag.startswith("b:") for r in requests):
            time.sleep(600)
        return super().generate(requests, params)

data, cache = sys.argv[1:]
pool = KernelPool(ExecutorConfig(backend="local", timeout=10), size=2, spare=0).start()
pool.install_signal_handlers()
rollout_targets(read_jsonl(data), Stuck({"a:1#0": ["So \\\\boxed{42}."]}), pool,
                RolloutSettings(k=1, max_turns=2, concurrency=1), cache)  # a, then b
"""


def test_a_killed_run_resumes_from_its_cache(kernel, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    a = logged(kernel, "a", [SET, RIGHT])
    b = logged(kernel, "b", [SET, WRONG])
    data, cache = tmp_path / "t.jsonl", tmp_path / "c.jsonl"
    append_jsonl(data, [a, b])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(cache)],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and cache.read_bytes().count(b"\n") >= 1):
            assert child.poll() is None, f"child ended early ({child.returncode})"
            assert time.monotonic() < deadline, "a's rollout never reached the cache"
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)  # mid-run: b's rollout is still going
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert [r.problem for r in RolloutCache(cache).read().values()] == ["a"]
    records, rep, _, backend = run([a, b], {"b:1#0": [RIGHT]}, cache, k=1, settings_turns=2)
    assert (rep.cached, rep.ran, rep.failed) == (1, 1, [])
    assert {c.tag.split("#")[0] for c in backend.calls} == {"b:1"}  # a was not redone
    assert {r.problem: r.correct for r in records.values()} == {"a": 1, "b": 1}
