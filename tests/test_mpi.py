"""MPI jobs on one node, with both MPIs: MPICH's mpiexec (its hydra proxy) and Open MPI's mpirun
(its ranks' output through pseudo-terminals), 4 ranks with shared memory between them and unix
and TCP sockets to the launcher, run by hpccr run as root; checkpointed in the middle of large
non-blocking messages and restored, or checkpointed while left running.  The restored run
prints exactly the steps and the result of a run that was never interrupted.

Workloads: workloads/mpi/ring.c, built here with each MPI's mpicc (the harness builds the
others with plain gcc), and workloads/mpi/ring.py with mpi4py built against each MPI
(scripts/setup.sh: .mpi4py/<mpi>).
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import TIMEOUT, describe

REPO = Path(__file__).resolve().parents[1]
RING = REPO / "tests" / "workloads" / "mpi" / "ring.c"
RING_PY = REPO / "tests" / "workloads" / "mpi" / "ring.py"
RANKS, STEPS, DUMP_AFTER = 4, 400, 60
MPIS = {  # compiler, launcher and its options
    "mpich": ("mpicc.mpich", ["mpiexec.mpich", "-n", RANKS]),
    "openmpi": ("mpicc.openmpi", ["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe",
                                  "-np", RANKS]),
}


@pytest.fixture(scope="module", params=[(mpi, kind) for mpi in sorted(MPIS)
                                         for kind in ("c", "mpi4py")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def ring(request, tmp_path_factory) -> list:
    """The command that runs the workload with one MPI, but its step count: ring.c built with
    that MPI's mpicc, or ring.py with mpi4py built against that MPI (scripts/setup.sh)."""
    mpi, kind = request.param
    compiler, launcher = MPIS[mpi]
    mpi4py = REPO / ".mpi4py" / mpi
    missing = [p for p in (compiler, launcher[0]) if not shutil.which(p)]
    if kind == "mpi4py" and not (mpi4py / "mpi4py").is_dir():
        missing.append(str(mpi4py))
    if missing:
        reason = f"{mpi} not installed ({' '.join(missing)}); run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: never skip there
        pytest.skip(reason)
    if kind == "mpi4py":
        return [*launcher, sys.executable, RING_PY, mpi4py]
    binary = tmp_path_factory.mktemp(mpi) / "ring"
    subprocess.run([compiler, "-O2", "-Wall", "-o", binary, RING], check=True,
                   capture_output=True, timeout=TIMEOUT)
    return [*launcher, binary]


def command(ring: list) -> list:
    return [*ring, STEPS]


@pytest.fixture(scope="module")
def reference(ring) -> list[str]:
    """What a run never interrupted prints: STEP lines and DONE."""
    res = subprocess.run([str(a) for a in command(ring)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=4 * TIMEOUT)
    assert res.returncode == 0, describe(res)
    return printed(res.stdout.splitlines())


def printed(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("STEP ", "DONE "))]


def start(cr, ring: list):
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
    restores and does the rest of the steps again, with the same values.  Open MPI's mpirun
    removes its session directory when it ends: hpccr run has it on /dev/shm (hpccr/mpi), whose
    files (held, mapped, a FIFO) the image keeps and the restore writes back."""
    job = start(tree_cr, ring)
    res = tree_cr.dump(job, tmp_path / "img", "--leave-running")
    assert res.returncode == 0, describe(res)
    assert job.proc.wait(timeout=4 * TIMEOUT) == 0, job.output()
    assert printed(job.lines()) == reference, job.output()
    res = tree_cr.restore(tmp_path / "img")
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    again = printed(job.lines())[len(reference):]
    assert len(again) > 1 and again == reference[-len(again):], job.output()


def test_periodic_checkpoints_then_restore(tree_cr, tmp_path, ring, reference):
    """Checkpointed every 2 s while it runs (hpccr run --interval), then the whole job killed
    (as a node failure would): the latest checkpoint restores and finishes the run, every step
    after the checkpoint printed again with the same values."""
    series = tmp_path / "series"
    job = tree_cr.start_job(command(ring), "-D", series, "--interval", "2s", ready=False)
    tree_cr.wait_until(lambda: (series / "latest").exists() or job.proc.poll() is not None,
                       "a periodic checkpoint of the MPI job", 4 * TIMEOUT)
    os.kill(job.pid, signal.SIGKILL)  # the job's pid 1: the whole job goes
    job.proc.wait(timeout=TIMEOUT)
    before = printed(job.lines())
    assert before and before[-1].startswith("STEP "), job.output()
    res = tree_cr.restore(series)
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    lines = printed(job.lines())
    again = lines[len(before):]
    assert before == reference[:len(before)], job.output()
    assert again == reference[len(reference) - len(again):], job.output()
    assert len(reference) - len(again) <= len(before), "steps were skipped"
