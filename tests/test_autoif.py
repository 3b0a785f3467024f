"""AutoIF pipeline on the replay backend (scripted model) and real sandboxed kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.pipelines.autoif import AutoIFConfig, jsonl, run_autoif, verifier_pool
from tirforge.agent.pipelines.autoif.common import Paths
from tirforge.agent.pipelines.autoif.parse import text_id
from tirforge.executors import ExecutorConfig
from tirforge.training.data import load_records, preference_pairs
from tirforge.trajectories.store import Store

LOWER, BANANA = "Answer in lowercase.", "Include the word banana."
THREE = "Use exactly three words."
CASES_LOWER = [{"input": "hello there", "output": True}, {"input": "Hello", "output": False},
               {"input": "ALL CAPS", "output": False}, {"input": "abc def", "output": True},
               {"input": "yes. ok", "output": True}]
CASES_BANANA = [{"input": "a banana", "output": True}, {"input": "no fruit", "output": False},
                {"input": "banana banana", "output": True}, {"input": "apple", "output": False}]


def draft(src: str, cases: list[dict]) -> str:
    return "Here it is:\n```json\n" + json.dumps({"function": src, "cases": cases}) + "\n```"


def fn(body: str) -> str:
    return "def evaluate(response):\n" + textwrap.indent(body, "    ")


GOOD_LOWER = [fn("return response == response.lower()"),
              fn("return not any(c.isupper() for c in response)"),
              fn("return response.islower()")]
GOOD_BANANA = [fn("return 'banana' in response"), fn("return response.count('banana') >= 1")]
HOSTILE = [fn("while True:\n    pass"),
           "import socket\n" + fn("return True"),
           fn("print('x' * 3_000_000)\nreturn True"),
           fn("import os\nos._exit(1)")]


def scripts() -> dict[str, list[str]]:
    """Scripted model outputs per request tag (stages 2-5)."""
    lo, ba, th = (text_id(t) for t in (LOWER, BANANA, THREE))
    s: dict[str, list[str]] = {"augment:round-0": [f"1. {THREE}\n2. answer in LOWERCASE!\n"]}
    lower = [draft(f, CASES_LOWER) for f in GOOD_LOWER]
    # Disagrees with its own cases (accuracy 3/5 < 0.8) and labels "Hello" the other way.
    lower.append(draft(fn("return True"), [*CASES_LOWER[:4], {"input": "Hello", "output": True}]))
    lower += ["{not json", "I cannot write JSON."]
    banana = [draft(f, CASES_BANANA) for f in GOOD_BANANA] + \
        [draft(f, CASES_BANANA) for f in HOSTILE]
    for iid, outs in ((lo, lower), (ba, banana), (th, ["nope"] * 6)):
        for k, text in enumerate(outs):
            s[f"verify:{iid}#{k}"] = [text]
    s[f"backtr:{lo}"] = ["Write in lowercase."]
    s[f"judge:{lo}"] = ["No."]
    s[f"backtr:{ba}"] = ["Never mention bananas."]
    s[f"judge:{ba}"] = ["Yes, they contradict."]
    return s


def config(**kw) -> AutoIFConfig:
    base = dict(augment_rounds=1, verifiers_per_instruction=6, min_functions=2, min_cases=3,
                min_accuracy=0.8, cell_timeout=1.0, queries_per_instruction=2,
                responses_per_query=3, max_batch=6)
    return AutoIFConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pool():
    p = verifier_pool(ExecutorConfig(backend="local", startup_timeout=60), size=1)
    yield p
    p.close()


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in (LOWER, BANANA)))
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"q": "Describe a cat."}\n{"q": "Name a colour."}\n')
    return {"seeds": seeds, "queries": queries, "work": tmp_path / "work"}


def test_stages_filters_pass_rates_and_dpo_rule(pool, inputs):
    cfg = config()
    work = inputs["work"]
    stats = run_autoif(work, cfg=cfg, backend=ReplayBackend(scripts()), pool=pool,
                       stages=["seeds", "augment", "verifiers", "crossval", "backtranslate",
                               "queries"], seeds=inputs["seeds"], queries=inputs["queries"],
                       query_field="q")
    # Augmentation: 2 proposed, the lowercase restatement is a duplicate of a seed.
    assert stats["augment"] == {"proposed": 2, "augmented_unique": 1, "instructions": 3,
                                "seconds": stats["augment"]["seconds"]}
    # Bad JSON is counted, not fatal: 2 for lowercase, 6 for the instruction with no drafts.
    assert stats["verifiers"]["bad_json"] == 8 and stats["verifiers"]["generations"] == 18
    paths = Paths(work)
    cv = {r["instruction"]: r for r in jsonl.read(paths.crossval)}
    lo, ba, th = cv[LOWER], cv[BANANA], cv[THREE]
    # The always-True verifier disagrees with its cases and is dropped; the conflicting
    # "Hello" label is dropped from the case pool.
    assert lo["kept"] and sorted(lo["functions"]) == sorted(GOOD_LOWER)
    assert lo["accuracy"][3] < 0.8 and "Hello" not in [c[0] for c in lo["cases"]]
    # Hostile verifiers are contained (timeout, refused import, flood, dead kernel) and fail.
    assert ba["statuses"][2:] == ["timeout", "rejected: imports socket", "flood", "died"]
    assert ba["kept"] and ba["functions"] == GOOD_BANANA
    assert not th["kept"] and th["n_functions"] == 0
    assert stats["crossval"]["functions_contained"] == 4
    # Back-translation: the policy judge calls the banana restatement a contradiction.
    bt = {r["instruction"]: r for r in jsonl.read(paths.backtranslate)}
    assert bt[LOWER]["kept"] and not bt[BANANA]["kept"] and bt[BANANA]["judge"] == "policy"
    pairs = jsonl.read(paths.pairs)
    assert {p["instruction"] for p in pairs} == {LOWER} and len(pairs) == 2

    # Stage 7 on its own with a fresh scripted model: pass rates over the 3 kept functions.
    by_query = {p["query"]: p["id"] for p in pairs}
    outs = {"Describe a cat.": ["hello world", "Hello World", "123 456"],
            "Name a colour.": ["HI", "BYE", "NO"]}
    resp = {f"respond:{by_query[q]}#{k}": [t] for q, ts in outs.items() for k, t in enumerate(ts)}
    stats = run_autoif(work, cfg=cfg, backend=ReplayBackend(resp), pool=pool,
                       stages=["responses", "export"])
    scores = {t.steps[0].text: t.score for t in Store(paths.responses)}
    assert scores == {"hello world": 1.0, "Hello World": 0.0, "123 456": pytest.approx(2 / 3),
                      "HI": 0.0, "BYE": 0.0, "NO": 0.0}
    assert stats["export"]["sft"] == 1 and stats["export"]["dpo_pairs"] == 2
    dpo = jsonl.read(paths.export / "dpo_pairs.jsonl")
    assert {(d["chosen"][0]["content"], d["rejected"][0]["content"]) for d in dpo} == {
        ("hello world", "Hello World"), ("123 456", "Hello World")}
    # The trainers read the export: messages rows for SFT, graded trajectories for DPO.
    sft = load_records(paths.export / "sft.jsonl")
    assert sft[0][-1] == {"role": "assistant", "content": "hello world"}
    trained_pairs = preference_pairs(load_records(paths.export / "dpo.jsonl"))
    assert {(c.steps[0].text, r.steps[0].text) for c, r in trained_pairs} == {
        ("hello world", "Hello World"), ("123 456", "Hello World")}
    _train_on_export(paths, work.parent)


def _train_on_export(paths: Paths, tmp: Path) -> None:
    """``tirforge train sft|dpo`` build their datasets from the export and take a step."""
    from tirforge.training.dpo import DPOTrainConfig
    from tirforge.training.dpo import make_trainer as dpo_trainer
    from tirforge.training.sft import SFTTrainConfig
    from tirforge.training.sft import make_trainer as sft_trainer

    from .training_utils import tiny_model_dir

    common = dict(model=tiny_model_dir(tmp), max_steps=1, per_device_train_batch_size=2,
                  logging_steps=1, save_steps=100, report_to=["none"])
    sft = sft_trainer(SFTTrainConfig(train_file=str(paths.export / "sft.jsonl"),
                                     output_dir=str(tmp / "sft"), **common))
    dpo = dpo_trainer(DPOTrainConfig(train_file=str(paths.export / "dpo.jsonl"),
                                     output_dir=str(tmp / "dpo"), **common))
    assert len(sft.train_dataset) == 1 and len(dpo.train_dataset) == 2
    assert dpo.train().training_loss > 0


class Boom(RuntimeError):
    pass


class FailingAfter(ReplayBackend):
    """Plays its scripts, then raises on call ``n`` (a crash mid-stage)."""

    def __init__(self, turns, n: int):
        super().__init__(turns)
        self.n = n

    def generate(self, requests, params):
        if len(self.batch_sizes) + 1 >= self.n:
            raise Boom("model crashed")
        return super().generate(requests, params)


def test_responses_resume_without_duplicates(pool, inputs):
    cfg = config(max_batch=2)
    work = inputs["work"]
    run_autoif(work, cfg=cfg, backend=ReplayBackend(scripts()), pool=pool,
               stages=["seeds", "augment", "verifiers", "crossval", "backtranslate", "queries"],
               seeds=inputs["seeds"], queries=inputs["queries"], query_field="q")
    pairs = jsonl.read(Paths(work).pairs)
    resp = {f"respond:{p['id']}#{k}": ["fine"] for p in pairs for k in range(3)}
    with pytest.raises(Boom):
        run_autoif(work, cfg=cfg, backend=FailingAfter(resp, 3), pool=pool, stages=["responses"])
    assert len(Store(Paths(work).responses).read()) == 4  # two batches of two landed
    again = ReplayBackend(resp)
    stats = run_autoif(work, cfg=cfg, backend=again, pool=pool, stages=["responses"])
    assert len(again.calls) == 2 and stats["responses"]["responses"] == 6
    assert stats["responses"]["mean_pass_rate"] == 1.0


KILLER = """
import json, os, sys
from tirforge.agent.backends.replay import ReplayBackend
from tirforge.agent.pipelines.autoif import AutoIFConfig, run_autoif
scripts, cfg = json.loads(sys.argv[2]), AutoIFConfig(**json.loads(sys.argv[3]))
class KillOnSecond(ReplayBackend):
    def generate(self, requests, params):
        if self.batch_sizes:
            os.kill(os.getpid(), 9)
        return super().generate(requests, params)
run_autoif(sys.argv[1], cfg=cfg, backend=KillOnSecond(scripts), stages=["verifiers"])
"""


def test_verifier_stage_resumes_after_kill(inputs):
    """SIGKILL in the middle of stage 3: the finished instruction is kept, the rest redone."""
    cfg = config()
    work = inputs["work"]
    run_autoif(work, cfg=cfg, backend=ReplayBackend(scripts()), stages=["seeds", "augment"],
               seeds=inputs["seeds"])
    kw = {k: v for k, v in cfg.as_dict().items() if k != "extra"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(work), json.dumps(scripts()),
                           json.dumps(kw)], env=os.environ.copy(), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(jsonl.read(Paths(work).verifiers)) == 1
    again = ReplayBackend(scripts())
    stats = run_autoif(work, cfg=cfg, backend=again, stages=["verifiers"])
    assert len(again.calls) == 12 and stats["verifiers"]["instructions"] == 3
    assert len({r["id"] for r in jsonl.read(Paths(work).verifiers)}) == 3


def test_torn_stage_file_line_is_skipped_and_redone(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b", "x"')  # killed mid-write
    assert jsonl.done_ids(f) == {"a"}
    with jsonl.Appender(f) as out:
        out.add({"id": "b"})
    assert [r["id"] for r in jsonl.read(f)] == ["a", "b"]


def test_bad_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok one"}\n{"text": "no field"}\n')
    with pytest.raises(ValueError, match=r"seeds.jsonl:2"):
        run_autoif(tmp_path / "w", stages=["seeds"], seeds=bad)
    with pytest.raises(ValueError, match="need a model backend"):
        run_autoif(tmp_path / "w", stages=["augment"])
    with pytest.raises(ValueError, match="need a kernel pool"):
        run_autoif(tmp_path / "w", backend=ReplayBackend([]), stages=["crossval"])
    with pytest.raises(ValueError, match="unknown stage"):
        run_autoif(tmp_path / "w", stages=["nope"])
    with pytest.raises(ValueError, match="min_accuracy"):
        AutoIFConfig(min_accuracy=1.5)


def test_shipped_seeds_and_queries():
    from tirforge.agent.pipelines.autoif.instructions import load_seeds
    from tirforge.agent.pipelines.autoif.responses import load_queries

    seeds = load_seeds()
    assert 28 <= len(seeds) <= 40 and len({s["id"] for s in seeds}) == len(seeds)
    assert len(load_queries()) >= 20


def test_queries_from_a_saved_dataset_and_text_seeds(tmp_path):
    import datasets

    from tirforge.agent.pipelines.autoif.instructions import load_seeds
    from tirforge.agent.pipelines.autoif.responses import load_queries

    datasets.Dataset.from_list([{"prompt": "Hi there."}, {"prompt": "  "}]).save_to_disk(
        str(tmp_path / "ds"))
    assert load_queries(tmp_path / "ds", field="prompt") == ["Hi there."]
    with pytest.raises(ValueError, match="no string field 'query'"):
        load_queries(tmp_path / "ds")
    txt = tmp_path / "seeds.txt"
    txt.write_text("Answer in lowercase.\n\nUse no commas.\n")
    assert [s["instruction"] for s in load_seeds(txt)] == ["Answer in lowercase.",
                                                          "Use no commas."]
