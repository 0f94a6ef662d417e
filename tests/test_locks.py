"""File locks (hpccr/engine/locks.py): an flock lock on a description shared with a child, POSIX
record locks on byte ranges and an OFD lock are held again after a restore, by pid or as a job.
A restore that cannot take a lock back (the checkpointed job still holds it) fails cleanly,
naming the file, and the image then restores once the lock is free.

Workload: workloads/locks.c DIR (probe processes check every lock after the window, and that
the flock lock is gone once the child unlocks its copy of the description).
"""

import os
import signal
from pathlib import Path

import pytest
from harness import describe, tree_of


@pytest.fixture(params=["pid", "job"])
def mode(request) -> str:
    return request.param


def start(cr, mode: str, directory: Path):
    if mode == "job":
        return cr.start_job([cr.binaries["locks"], directory])
    return cr.start(cr.binaries["locks"], directory, append=True)


def test_without_checkpoint(tree_cr, tmp_path):
    workload = start(tree_cr, "pid", tmp_path)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_locks_held_after_restore(tree_cr, tmp_path, mode):
    workload = start(tree_cr, mode, tmp_path)
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    shown = tree_cr.run("show", img)
    assert "[flock write lock]" in shown.stdout, shown.stdout
    assert "[posix write lock bytes 10-19]" in shown.stdout, shown.stdout
    assert "[posix read lock bytes 30-EOF]" in shown.stdout, shown.stdout
    assert "[ofd write lock bytes 0-EOF]" in shown.stdout, shown.stdout
    tree_cr.restore_and_pass(workload, img)


def test_restore_while_the_locks_are_held(tree_cr, tmp_path):
    """A --leave-stopped dump of a job, restored while the original (whose pids are its own, in
    its pid namespace) still holds its locks: the restore fails (19) naming a locked file; once
    the original has gone on (SIGCONT) and ended, the same image restores and passes."""
    workload = start(tree_cr, "job", tmp_path)
    img = tmp_path / "img"
    res = tree_cr.dump(workload, img, "--leave-stopped")
    assert res.returncode == 0, describe(res)
    failed = tree_cr.restore(img)
    message = tree_cr.assert_error(failed, 19)
    assert str(tmp_path) in message and "lock back" in message, message
    for pid in tree_of(workload.pid):
        os.kill(pid, signal.SIGCONT)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    tree_cr.restore_and_pass(workload, img, passes=2)
