"""MPI jobs on one node: MPICH's mpiexec, its hydra proxy and 4 ranks (shared memory between the
ranks, unix and TCP sockets to the launcher), run by hpccr run, checkpointed in the middle of
large non-blocking messages and restored, or checkpointed while left running; the restored
run prints exactly the steps and the result of a run that was never interrupted.

Workload: workloads/mpi/ring.c, built here with MPICH's mpicc (the harness builds the others
with plain gcc).  Open MPI is not covered yet: its mpirun gives each rank a pseudo-terminal
(/dev/ptmx), which hpccr cannot checkpoint yet.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import TIMEOUT, describe

RING = Path(__file__).parent / "workloads" / "mpi" / "ring.c"
RANKS, STEPS, DUMP_AFTER = 4, 400, 60
MPICH = ("mpicc.mpich", "mpiexec.mpich")


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> Path:
    missing = [p for p in MPICH if not shutil.which(p)]
    if missing:
        reason = f"MPICH not installed ({' '.join(missing)}); run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: never skip there
        pytest.skip(reason)
    binary = tmp_path_factory.mktemp("mpi") / "ring"
    subprocess.run(["mpicc.mpich", "-O2", "-Wall", "-o", binary, RING], check=True,
                   capture_output=True, timeout=TIMEOUT)
    return binary


def command(ring: Path) -> list:
    return ["mpiexec.mpich", "-n", RANKS, ring, STEPS]


@pytest.fixture(scope="module")
def reference(ring) -> list[str]:
    """What a run never interrupted prints: STEP lines and DONE."""
    res = subprocess.run([str(a) for a in command(ring)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=4 * TIMEOUT)
    assert res.returncode == 0, describe(res)
    return printed(res.stdout.splitlines())


def printed(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("STEP ", "DONE "))]


def start(cr, ring: Path):
    """The MPI job under hpccr run, once it has made DUMP_AFTER steps."""
    job = cr.start_job(command(ring), ready=False)
    cr.wait_until(lambda: len(job.values("STEP")) >= DUMP_AFTER or job.proc.poll() is not None,
                  f"{DUMP_AFTER} steps of the MPI job", 4 * TIMEOUT)
    assert job.proc.poll() is None, job.output()
    return job


def test_checkpoint_restart(tree_cr, tmp_path, ring, reference):
    """Killed by the dump, restored: every step once, and the same result."""
    job = start(tree_cr, ring)
    tree_cr.dump_and_kill(job, tmp_path / "img")
    res = tree_cr.restore(tmp_path / "img")
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    assert printed(job.lines()) == reference, job.output()


def test_leave_running_then_restore(tree_cr, tmp_path, ring, reference):
    """Dumped while it runs on: the original finishes as if nothing happened; then the image
    restores and does the rest of the steps again, with the same values."""
    job = start(tree_cr, ring)
    res = tree_cr.dump(job, tmp_path / "img", "--leave-running")
    assert res.returncode == 0, describe(res)
    assert job.proc.wait(timeout=4 * TIMEOUT) == 0, job.output()
    assert printed(job.lines()) == reference, job.output()
    res = tree_cr.restore(tmp_path / "img")
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    again = printed(job.lines())[len(reference):]
    assert len(again) > 1 and again == reference[-len(again):], job.output()
