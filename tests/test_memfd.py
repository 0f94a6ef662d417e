"""memfds come back as memfds: name, content, size, offset, flags and seals (with or without
MFD_ALLOW_SEALING); one that is open and mapped shared, by its holder and by a child that closed
its descriptor, stays one object, written through the descriptor and seen in the mappings and
the other way round.  A memfd sealed F_SEAL_FUTURE_WRITE while mapped writable keeps both.

Workload: workloads/fd_memfd.c [future].  It checks its own state after the window.
"""

from pathlib import Path

import pytest


@pytest.fixture(params=["pid", "job"])
def mode(request) -> str:
    """`pid`: the tree is dumped by its root pid; `job`: it runs under `hpccr run`, in a pid
    namespace of its own."""
    return request.param


def test_without_checkpoint(cr):
    workload = cr.start("fd_memfd")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_checkpoint_restart(tree_cr, tmp_path, mode):
    binary = tree_cr.binaries["fd_memfd"]
    workload = tree_cr.start_job([binary]) if mode == "job" else tree_cr.start(binary)
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_leave_running(tree_cr, tmp_path):
    """The original runs on and passes, then the image restores and passes too."""
    workload = tree_cr.start(tree_cr.binaries["fd_memfd"], append=True)
    tree_cr.leave_running_then_restore(workload, tmp_path / "img")


def test_owned_by_its_user(tree_cr, tmp_path):
    """A process run as nobody: its memfds, made again by root, are nobody's (checked by the
    workload)."""
    setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    workload = tree_cr.start(Path("/usr/bin/setpriv"), *setpriv, tree_cr.binaries["fd_memfd"],
                             append=True)
    assert workload.status()["Uid"].split()[1] == "65534"
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_future_write_seal_on_a_writable_mapping(cr, tmp_path):
    """A memfd mapped shared and writable, then sealed F_SEAL_FUTURE_WRITE: the restore maps it
    before it seals it, so the mapping stays writable and the seal holds."""
    workload = cr.start("fd_memfd", "future")
    cr.checkpoint_restart(workload, tmp_path / "img")
