"""Fault kinds recorded in trajectory steps, counted for collection summaries."""

import json

from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.faults import fault_counts, has_infra_fault
from tirforge.trajectories.schema import Step, Trajectory


def traj(*faults):
    steps = [Step(text="t", code="c", execution=ExecutionResult(fault=f)) for f in faults]
    return Trajectory(problem="p", steps=[*steps, Step(text="no code")])


def test_fault_counts_and_infra():
    ts = [traj("error", None, "timeout"), traj("error", "kernel_died"), traj()]
    assert fault_counts(ts) == {"error": 2, "kernel_died": 1, "timeout": 1}
    assert [has_infra_fault(t) for t in ts] == [False, True, False]


def test_rows_written_before_faults_still_load():
    row = json.loads(traj("memory").model_dump_json())
    assert row["steps"][0]["execution"].pop("fault") == "memory"
    old = Trajectory.model_validate(row)  # no "fault" key anywhere, as in older files
    assert old.steps[0].fault is None and fault_counts([old]) == {}
    assert Trajectory.model_validate_json(traj("disk").model_dump_json()).steps[0].fault == "disk"
