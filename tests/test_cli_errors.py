"""What a first-time user of the ``tirforge`` CLI runs into: every README command parses, bad
option values and output paths are refused at once with one clear line (nothing made on disk),
help text keeps its brackets, ``--sandbox none`` says so, a mistyped ``TIRFORGE_DATA`` is an
error, and a ``kill -9``-ed run's temp dirs are removed by the next one. Real CLI (Typer's
``CliRunner`` on the real app), real kernels, real stores."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from typer._click.core import Command, Context  # typer vendors its own click
from typer._click.exceptions import UsageError
from typer.main import get_command
from typer.testing import CliRunner

from tirforge.agent.strategies import ScorerRequired, choose
from tirforge.apps.cli import app
from tirforge.executors import ExecutorConfig, KernelPool, tempdirs
from tirforge.trajectories import hub
from tirforge.trajectories.datasets import DatasetNotFoundError, resolve
from tirforge.trajectories.store import Store

from .test_collect import CODE, FIXTURE
from .test_export import traj

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
GSM8K = ["--problem-field", "question", "--answer-field", "answer", "--answer-format", "gsm8k"]


def invoke(args: list[str], **env: str):
    return runner.invoke(app, args, env={"COLUMNS": "200", **env})


def one_line(output: str) -> str:
    """A Rich error panel as plain text: box characters and line breaks removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


# --------------------------------------------------------------------------- README commands


def readme_commands() -> list[list[str]]:
    """Every ``tirforge`` command line of README.md's bash blocks, continuations joined, as the
    arguments after ``tirforge`` (or ``-m tirforge.apps.cli``)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w.endswith("/tirforge") or w in ("tirforge", "tirforge.apps.cli"):
                    if words[i + 1 : i + 2] and not words[i + 1].startswith("version"):
                        out.append(words[i + 1 :])
                    break
    return out


def test_readme_has_the_commands_it_should():
    cmds = readme_commands()
    firsts = {c[0] if c[0] not in ("train", "sandbox") else " ".join(c[:2]) for c in cmds}
    assert {"solve", "collect", "select", "export", "evolve", "eval", "loop", "autoif", "chat",
            "score", "train sft", "train rm", "train dpo", "train grpo", "train value"} <= firsts


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(args):
    """The README's own arguments go through click's full parse (every flag exists, every value
    converts, nothing missing or extra) without running the command."""
    cmd: Command = get_command(app)
    ctx = Context(cmd, info_name="tirforge")
    rest = list(args)
    while hasattr(cmd, "get_command"):  # a group: descend to the named command
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"no command {rest[0]!r} in tirforge {' '.join(args)}"
        ctx, cmd, rest = Context(sub, info_name=rest[0], parent=ctx), sub, rest[1:]
    try:
        cmd.make_context(ctx.info_name, rest, parent=ctx.parent)
    except UsageError as e:
        pytest.fail(f"tirforge {' '.join(args)}: {e.format_message()}")
    res = invoke([*args, "--help"])  # and its help renders
    assert res.exit_code == 0, f"tirforge {' '.join(args)}:\n{res.output}"


def test_train_without_model_uses_the_default_model(tmp_path):
    """The AutoIF section's `tirforge train sft --train-file ...` (no --model, no config)."""
    res = invoke(["train", "sft", "--train-file", str(tmp_path / "missing.jsonl"),
                  "--output-dir", str(tmp_path / "out")])
    assert "default model (smollm2)" in res.output, res.output
    assert "no model" not in res.output
    # It got past the model to the data, which is missing: a clean error, not a traceback.
    assert res.exit_code == 2 and "no training data" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- choices

CHOICES = {
    "--executor": ("podman", ["local", "docker"]),
    "--sandbox": ("firejail", ["auto", "bwrap", "none"]),
    "--backend": ("llamacpp", ["transformers", "vllm", "openai"]),
    "--format": ("qwen-tri", ["qwen-tir", "qwen-cot", "dotamath"]),
}
COMMANDS = {
    "solve": ["solve", "1+1", "--out", "{tmp}/o/t.jsonl"],
    "chat": ["chat", "--db", "{tmp}/o/chat.db"],
    "collect": ["collect", str(FIXTURE), "--out", "{tmp}/o"],
    "eval": ["eval", "--out", "{tmp}/o"],
    "autoif": ["autoif", "{tmp}/o"],
}


def _cases():
    for name, base in COMMANDS.items():
        for opt in CHOICES:
            if name == "autoif" and opt == "--format":
                continue  # autoif has no prompt format
            yield pytest.param(name, base, opt, id=f"{name}{opt}")


@pytest.mark.parametrize(("name", "base", "opt"), list(_cases()))
def test_bad_choice_is_refused_before_anything_runs(tmp_path, name, base, opt):
    bad, valid = CHOICES[opt]
    args = [a.replace("{tmp}", str(tmp_path)) for a in base]
    res = invoke([*args, opt, bad])
    text = one_line(res.output)
    assert res.exit_code == 2, res.output
    assert f"'{bad}' is not one of" in text and all(f"'{v}'" in text for v in valid), text
    assert "Traceback" not in res.output and "Loading" not in res.output
    assert list(tmp_path.iterdir()) == []  # no store, no lock, no half-made folder


def test_other_closed_choices_are_refused_too():
    res = invoke(["solve", "1+1", "--strategy", "best-of-m"])
    assert res.exit_code == 2 and "'best-of-m' is not one of" in one_line(res.output)
    res = invoke(["score", "x.jsonl", "--rm", "r", "--style", "markdown"])
    assert res.exit_code == 2 and "'tool', 'fenced'" in one_line(res.output)
    res = invoke(["train", "rm", "--loss", "hinge"])  # a Literal field of the trainer config
    assert res.exit_code == 2 and "'pairwise', 'listwise'" in one_line(res.output)
    res = invoke(["train", "grpo", "--problems", "p.jsonl", "--sandbox", "firejail"])
    assert res.exit_code == 2 and "'auto', 'bwrap', 'none'" in one_line(res.output)
    res = invoke(["train", "sft", "--style", "chatml"])
    assert res.exit_code == 2 and "'tool', 'fenced'" in one_line(res.output)


def test_a_model_that_does_not_load_is_one_line_and_leaves_no_folder(tmp_path):
    for args in (["collect", str(FIXTURE), *GSM8K, "--out", "{tmp}/store"],
                 ["eval", "--benchmarks", "gsm8k", "--out", "{tmp}/eval"],
                 ["evolve", "gsm8k", "--out", "{tmp}/new.jsonl"],
                 ["autoif", "{tmp}/work", "--stages", "seeds,augment"]):
        res = invoke([a.replace("{tmp}", str(tmp_path)) for a in args]
                     + ["--model", str(tmp_path / "no-model")],
                     TIRFORGE_DATA=str(ROOT / "tests" / "fixtures" / "data"))
        assert res.exit_code == 2, (args, res.output)
        assert "No model folder at" in res.output and "Traceback" not in res.output, res.output
        assert list(tmp_path.iterdir()) == [], args  # no store folder with a stale writer.lock


def test_openai_backend_without_a_server_url_is_refused_at_once(tmp_path):
    for args in (["collect", str(FIXTURE), "--out", "{tmp}/store"], ["eval", "--out", "{tmp}/e"],
                 ["chat"], ["autoif", "{tmp}/work"]):
        res = invoke([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--backend", "openai"])
        assert res.exit_code == 2 and "needs --base-url" in one_line(res.output), res.output
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- --out paths


@pytest.fixture
def store(tmp_path) -> Path:
    with Store(tmp_path / "run") as s:
        for k, (verdict, answer) in enumerate([("correct", "5"), ("incorrect", "6")]):
            t = traj(verdict, answer)
            t.sample, t.config_hash = k, "h"
            s.add(t)
    return tmp_path / "run"


def test_select_and_export_write_jsonl_for_a_jsonl_path(tmp_path, store):
    res = invoke(["select", str(store), "--out", str(tmp_path / "sft.jsonl"),
                  "--dpo-out", str(tmp_path / "dpo.jsonl")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["messages"][3] == {"role": "tool", "content": "5"}
    pair = json.loads((tmp_path / "dpo.jsonl").read_text())
    assert pair["chosen"][-1]["content"].endswith("{5}.")
    res = invoke(["export", str(store), "--out", str(tmp_path / "all.jsonl")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "all.jsonl").is_file()
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 2
    res = invoke(["export", str(store), "--out", str(tmp_path / "folder")])  # no suffix: Arrow
    assert res.exit_code == 0 and len(datasets.load_from_disk(str(tmp_path / "folder"))) == 2


@pytest.mark.parametrize("args", [
    ["select", "{store}", "--out", "{tmp}/sft.csv"],
    ["select", "{store}", "--out", "{tmp}/sft.jsonl", "--dpo-out", "{tmp}/dpo.json"],
    ["export", "{store}", "--out", "{tmp}/all.json"],
    ["collect", str(FIXTURE), "--out", "{tmp}/store.jsonl"],
    ["eval", "--out", "{tmp}/results.json"],
    ["solve", "1+1", "--out", "{tmp}/t.json"],
    ["evolve", str(FIXTURE), "--out", "{tmp}/new.parquet"],
    ["score", "{tmp}/t.jsonl", "--rm", "rm", "--out", "{tmp}/scored.parquet"],
], ids=lambda a: f"{a[0]} {a[-1].rsplit('/', 1)[-1]}")
def test_an_out_path_of_the_wrong_kind_is_refused(tmp_path, store, args):
    before = sorted(tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)).replace("{store}", str(store)) for a in args]
    res = invoke(args)
    text = one_line(res.output)
    assert res.exit_code == 2, res.output
    assert "Invalid value for --out" in text or "Invalid value for --dpo-out" in text, text
    assert "Traceback" not in res.output
    assert sorted(tmp_path.iterdir()) == before  # nothing written


# --------------------------------------------------------------------------- help text


def _commands(cmd: Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if hasattr(cmd, "get_command"):
        ctx = Context(cmd)
        for name in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, name), (*path, name))


def test_square_brackets_in_help_survive_rich_markup():
    """Rich reads ``[turns]`` as a style tag and drops it unless escaped."""
    checked = 0
    for path, cmd in _commands(get_command(app)):
        for p in cmd.params:
            help_text = getattr(p, "help", None) or ""
            if "[" not in help_text or path == ():
                continue
            shown = one_line(invoke([*path, "--help"]).output)
            for bracketed in re.findall(r"\[[^\]]*\]", help_text.replace("\\[", "[")):
                assert bracketed in shown, (path, p.name, bracketed)
                checked += 1
    assert checked >= 3  # autoif --replay, collect / eval --concurrency, trainer fields


def test_help_is_clean():
    top = invoke(["--help"]).output
    assert top.index("solve") < top.index("collect") < top.index("train")  # order of use
    sft = invoke(["train", "sft", "--help"]).output
    assert "--install-completion" not in sft and "``" not in sft
    assert "value" in top  # the train group names all five trainers


# --------------------------------------------------------------------------- sandbox none


def test_sandbox_none_warns_that_code_runs_unisolated(tmp_path):
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([CODE, "So the answer is \\boxed{2870}."]))
    res = invoke(["collect", str(FIXTURE), *GSM8K, "--limit", "1", "--samples", "1",
                  "--out", str(tmp_path / "store"), "--replay", str(turns), "--concurrency",
                  "1", "--sandbox", "none", "--no-fsync"])
    assert res.exit_code == 0, res.output
    assert "--sandbox none: model-written code runs on this host without isolation" in \
        one_line(res.output)
    res = invoke(["collect", str(FIXTURE), *GSM8K, "--limit", "1", "--samples", "1",
                  "--out", str(tmp_path / "store"), "--replay", str(turns), "--sandbox", "bwrap"])
    assert res.exit_code == 0 and "without isolation" not in res.output


# --------------------------------------------------------------------------- TIRFORGE_DATA


def test_a_missing_tirforge_data_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TIRFORGE_DATA", str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFoundError, match=r"TIRFORGE_DATA=.*typo: no such folder"):
        resolve("gsm8k")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TIRFORGE_DATA", str(tmp_path / "file"))
    with pytest.raises(hub.DataRootMissing, match="a file, not a folder"):
        hub.env_data_root()
    monkeypatch.setenv("TIRFORGE_DATA", str(tmp_path / "typo"))
    res = invoke(["collect", "gsm8k", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "TIRFORGE_DATA=" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    res = invoke(["eval", "--benchmarks", "gsm8k", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "TIRFORGE_DATA=" in res.output


# --------------------------------------------------------------------------- library wording


def test_choose_without_scorer_is_worded_for_the_library():
    with pytest.raises(ScorerRequired, match="pass scorer=") as e:
        choose([traj(), traj("incorrect", "6")], "best-of-n")
    assert "--rm" not in str(e.value) and e.value.strategy == "best-of-n"
    assert isinstance(e.value, ValueError)  # callers catching ValueError still do


def test_solve_maps_a_missing_scorer_to_its_options(monkeypatch):
    """Should the CLI ever reach the library without a scorer, the user reads option names."""
    from .test_strategies import SAMPLES, solve_cli

    monkeypatch.setattr("tirforge.apps.cli._solve_scorer", lambda *a: None)
    r, _ = solve_cli(monkeypatch, SAMPLES, "--strategy", "best-of-n", "--n", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--strategy best-of-n needs a scorer: pass --rm PATH" in r.output
    assert "scorer=" not in r.output


# --------------------------------------------------------------------------- stale temp dirs


def test_kernel_pool_start_removes_only_dead_owners_temp_dirs(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the pool's temp dirs go here
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f"tirforge-kernel-{dead.pid}-abcd1234"
        alive = tmp_path / f"tirforge-kernel-{live.pid}-abcd1234"
        legacy = tmp_path / "tirforge-kernel-x1y2z3"  # no pid in the name: not ours to judge
        for d in (stale, alive, legacy):
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "f.txt").write_text("x")
        monkeypatch.setattr(tempdirs, "_swept", set())  # as in a fresh process
        cfg = ExecutorConfig(backend="local", sandbox="bwrap")
        with KernelPool(cfg, size=1, spare=0) as pool, pool.kernel() as k:
            assert k.run("print(6*7)").stdout.strip() == "42"
            mine = Path(k.cwd)
            assert mine.name.startswith(f"tirforge-kernel-{os.getpid()}-")
        assert not stale.exists()
        assert alive.exists() and legacy.exists()
        assert not mine.exists()  # closed normally: its own dir is gone too
    finally:
        live.kill()
        live.wait()


def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path, store):
    out = tmp_path / "sft.jsonl"
    out.write_text('{"mine": 1}\n' * 4)
    for cmd in (["select", str(store)], ["export", str(store)]):
        res = invoke([*cmd, "--out", str(out)])
        assert res.exit_code == 2 and "exists; pass --overwrite" in one_line(res.output)
        assert out.read_text() == '{"mine": 1}\n' * 4
    res = invoke(["export", str(store), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 2
    # --dpo-out is an output too
    res = invoke(["select", str(store), "--out", str(tmp_path / "new.jsonl"), "--dpo-out",
                  str(out)])
    assert res.exit_code == 2 and "--dpo-out" in one_line(res.output)


@pytest.mark.parametrize("cmd", ["select", "export"])
def test_a_dataset_is_never_written_into_a_store_or_run_folder(tmp_path, store, cmd):
    """save_to_disk would mix Arrow files into the store's shards (even asked to overwrite)."""
    before = sorted(p.name for p in store.iterdir())
    res = invoke([cmd, str(store), "--out", str(store), "--overwrite"])
    assert res.exit_code == 2 and "holding other files" in one_line(res.output), res.output
    assert sorted(p.name for p in store.iterdir()) == before
    # An empty folder, or a dataset written earlier (with --overwrite), is fine.
    (tmp_path / "empty").mkdir()
    assert invoke([cmd, str(store), "--out", str(tmp_path / "empty")]).exit_code == 0
    res = invoke([cmd, str(store), "--out", str(tmp_path / "empty"), "--overwrite"])
    assert res.exit_code == 0, res.output


def test_training_reads_a_store_folder_and_a_missing_file_fails_before_any_model(
        tmp_path, store):
    from tirforge.training.data import load_records

    records = load_records(store)
    assert sorted(t.verdict for t in records) == ["correct", "incorrect"]
    with Store(store) as s:  # a second record of a stored key is read once
        s.add(records[0])
    assert len(load_records(store)) == 2
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="neither a collect store"):
        load_records(tmp_path / "nothing")
    for trainer in ("sft", "rm", "dpo", "value"):
        res = invoke(["train", trainer, "--model", str(tmp_path / "no-model"),
                      "--train-file", str(tmp_path / "missing.jsonl")])
        assert res.exit_code == 2, res.output
        assert f"no training data at {tmp_path / 'missing.jsonl'}" in one_line(res.output)
    res = invoke(["score", str(store), "--rm", "rm"])  # a folder cannot be rewritten in place
    assert res.exit_code == 2 and "give --out" in one_line(res.output)
