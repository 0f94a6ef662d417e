"""POSIX timers: after a restore every timer has its id, clock, notification and interval, the
one-shot one its remaining time, and the periodic ones keep delivering their signals with the
right si_timerid and si_value, to the process or to the one thread they name.

Workload: workloads/ptimer.c (checks all of it itself), dumped by its pid or run as a job by
`hpccr run` (where the thread a timer signals has another tid inside the job than outside).
"""

import json

import pytest


@pytest.fixture(params=["pid", "job"])
def mode(request) -> str:
    return request.param


def test_posix_timers(tree_cr, tmp_path, mode):
    if mode == "job":
        workload = tree_cr.start_job([tree_cr.binaries["ptimer"]])
    else:
        workload = tree_cr.start("ptimer")
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    meta = json.loads((tmp_path / "img" / "image.json").read_text())
    timers = [t for p in meta["processes"] for t in p["posix_timers"]]
    assert sorted(t["id"] for t in timers) == [0, 1, 2, 3], timers
    tree_cr.restore_and_pass(workload, tmp_path / "img")
