"""Credentials: a process of uid/gid 1000, dumped and restored by root, comes back with exactly
its ids and no capabilities (a restore never grants privileges).

Workloads: workloads/creds.c (checks its ids, capabilities, pgid and sid itself; waits for
SIGUSR1 so that the test can look at the restored process from outside first), fd_setuid.c UID
DIR (a pipe and a root-only FIFO opened as root by a worker that then dropped to UID).
"""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

AS_USER = {"user": 1000, "group": 1000, "extra_groups": []}
NO_CAPS = "0" * 16

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a uid 1000 process")


@pytest.fixture
def creds_program(workload_binaries):
    """The workload copied where uid 1000 can run it (the session's build dir is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="hpccr-creds-"))
    directory.chmod(0o755)
    program = directory / "creds"
    shutil.copy(workload_binaries["creds"], program)
    program.chmod(0o755)
    yield program
    shutil.rmtree(directory)


def test_credentials_without_checkpoint(cr, creds_program):
    workload = cr.start(creds_program, cwd=creds_program.parent, **AS_USER)
    os.kill(workload.pid, signal.SIGUSR1)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_credentials(cr, tmp_path, creds_program):
    workload = cr.start(creds_program, cwd=creds_program.parent, **AS_USER)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    pidfile = tmp_path / "restored.pid"
    res = cr.restore(img, "--detach", "--pidfile", pidfile)
    assert res.returncode == 0, res.stderr
    assert int(pidfile.read_text()) == workload.pid

    status = workload.status()
    assert status["Uid"].split() == ["1000"] * 4
    assert status["Gid"].split() == ["1000"] * 4
    assert status["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert status[caps] == NO_CAPS, (caps, status[caps])
    assert status["TracerPid"] == "0"
    assert status["NoNewPrivs"] == "0"

    os.kill(workload.pid, signal.SIGUSR1)
    workload.wait_gone()
    workload.assert_passed()


@pytest.mark.parametrize("mode", ["pid", "job"])
def test_descriptors_opened_before_dropping_privileges(tree_cr, tmp_path, mode):
    """The worker's pipe and FIFO come back though its uid could not open them again: they were
    opened by root before the worker dropped its privileges, not by path."""
    command = [tree_cr.binaries["fd_setuid"], 2, tmp_path]
    if mode == "job":
        workload = tree_cr.start_job(command)
    else:
        workload = tree_cr.start(*command)
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
