"""The real default model (SmolLM2-135M-Instruct) solves a problem end to end through the CLI.

Slow (model conversion on first use, CPU generation) but always run, in CI too.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tirforge.trajectories.schema import read_jsonl

pytestmark = pytest.mark.slow


def test_cli_solve_with_default_model(tmp_path):
    exe = Path(sys.executable).with_name("tirforge")
    cmd = [str(exe) if exe.exists() else shutil.which("tirforge")]
    out = tmp_path / "runs" / "solve.jsonl"
    proc = subprocess.run(
        [*cmd, "solve", "What is the sum of the squares of the first 20 positive integers?",
         "--answer", "2870", "--max-turns", "4", "--max-new-tokens", "300", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final answer" in proc.stdout
    [traj] = read_jsonl(out)
    assert traj.model == "smollm2"
    # Code written by the model really ran in the kernel.
    ran = [s for s in traj.steps if s.execution is not None]
    assert ran, f"the model wrote no code: {traj.steps}"
    assert any(s.execution.stdout or s.execution.result or s.execution.error_name for s in ran)
    assert traj.steps[0].code in traj.steps[0].text
    # ... and the trajectory was graded against the reference.
    assert traj.verdict in {"correct", "incorrect", "no_answer", "unparseable"}
    assert traj.reference == "2870"
    assert traj.timings["total_s"] > 0
