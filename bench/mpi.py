"""Checkpoint and restore of a 4-rank MPI job, beside one process holding the same memory.

    cd /work/main
    PYTHONPATH=. python3 bench/mpi.py [--mpi mpich|openmpi] [--workload c|mpi4py]
                                      [--per-rank 256M] [--dir /var/tmp]

Needs root, the native parts built (scripts/setup.sh does it) and the MPI (scripts/setup.sh
installs both, and mpi4py built against each).  The job runs under `hpccr run` with 4 ranks:
tests/workloads/mpi/ring.c, each rank with two message buffers making --per-rank of memory,
exchanging them around a ring; or tests/workloads/mpi/ring.py (mpi4py: a ring exchange and an
allreduce each step), each rank holding --per-rank of memory.  It calls the
engine API (dump(), restore_tree()), not the `hpccr` command, so Python start-up is not
counted.  Printed, for the MPI job and for bench/workload.c holding the job's whole memory in
one process: the frozen time and the total of a dump that leaves it running, of a dump that
kills it, and the restore until the processes run again (the MPI job: until it prints its next
step, so that all of it is known to run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dump_restore  # noqa: E402 - bench/dump_restore.py, beside this file

from hpccr.engine.dump import dump  # noqa: E402
from hpccr.engine.restore import restore_tree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RING = REPO / "tests" / "workloads" / "mpi" / "ring.c"
RING_PY = REPO / "tests" / "workloads" / "mpi" / "ring.py"
RANKS = 4
MPIS = {"mpich": ("mpicc.mpich", ["mpiexec.mpich", "-n", str(RANKS)]),
        "openmpi": ("mpicc.openmpi", ["mpirun.openmpi", "--allow-run-as-root",
                                      "--oversubscribe", "-np", str(RANKS)])}
TIMEOUT = 300


@contextlib.contextmanager
def scratch(prefix: str, parent: str) -> Iterator[Path]:
    """A directory of this run's own under `parent`, removed at the end; root only."""
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(0.02)


class MpiJob:
    """The ring under `hpccr run`, its output in a log."""

    def __init__(self, command: list[str], work: Path):
        self.log = work / "job.log"
        argv = [sys.executable, "-m", "hpccr", "run", "--", *command]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        wait_for(lambda: self.pid_line() is not None, "hpccr run to start the job")
        self.pid = int(self.pid_line())

    def pid_line(self) -> str | None:
        return next((line.split()[-1] for line in self.lines()
                     if line.startswith("hpccr run: job pid ")), None)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def steps(self) -> int:
        return sum(line.startswith("STEP ") for line in self.lines())

    def wait_steps(self, count: int) -> None:
        wait_for(lambda: self.steps() >= count, f"{count} steps of the MPI job")


def figures(label: str, run, kill, restore_s: float) -> str:
    return (f"{label:34} {run.frozen_s * 1e3:9.0f} {run.dump_s * 1e3:9.0f} "
            f"{kill.frozen_s * 1e3:9.0f} {kill.dump_s * 1e3:9.0f} {restore_s * 1e3:10.0f}")


def ring_command(mpi: str, workload: str, per_rank: int, work: Path) -> list[str]:
    compiler, launcher = MPIS[mpi]
    if workload == "mpi4py":
        mpi4py = REPO / ".mpi4py" / mpi
        if not (mpi4py / "mpi4py").is_dir():
            sys.exit(f"bench: no mpi4py for {mpi} in {mpi4py} (run scripts/setup.sh)")
        return [*launcher, sys.executable, str(RING_PY), str(mpi4py), "100000000",
                str(per_rank >> 20)]
    binary = str(work / "ring")
    subprocess.run([compiler, "-O2", "-o", binary, str(RING)], check=True)
    return [*launcher, binary, "100000000", str(per_rank // 2)]


def bench_mpi(mpi: str, workload: str, per_rank: int, work: Path) -> str:
    job = MpiJob(ring_command(mpi, workload, per_rank, work), work)
    try:
        job.wait_steps(2)
        run = dump(job.pid, str(work / "run.img"), mode="running")
        kill = dump(job.pid, str(work / "kill.img"), mode="kill")
        job.proc.wait(timeout=TIMEOUT)
        done = job.steps()
        started = time.monotonic()
        root, network = restore_tree(str(work / "kill.img"))
        job.wait_steps(done + 1)
        restore_s = time.monotonic() - started
        os.kill(root, signal.SIGKILL)
        os.waitpid(root, 0)
        if network is not None:
            network.remove()
    finally:
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
    return figures(f"{mpi} {workload}, {RANKS} ranks x {dump_restore.human(per_rank)}", run,
                   kill, restore_s)


def bench_single(size: int, work: Path) -> str:
    exe = dump_restore.compile_workload(str(work))
    w = dump_restore.Workload(exe, size, str(work / "single.log"))
    try:
        run = dump(w.pid, str(work / "single-run.img"), mode="running")
        kill = dump(w.pid, str(work / "single-kill.img"), mode="kill")
        w.killed_by_dump()
        started = time.monotonic()
        restore_tree(str(work / "single-kill.img"))
        restore_s = time.monotonic() - started
        w.restored()
        answer = w.verify()
    finally:
        w.stop()
    return figures(f"one process x {dump_restore.human(size)} ({answer})", run, kill, restore_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mpi", choices=sorted(MPIS), default="mpich")
    parser.add_argument("--workload", choices=("c", "mpi4py"), default="c")
    parser.add_argument("--per-rank", type=dump_restore.parse_size, default="256M")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    with scratch("hpccr-bench-mpi-", args.dir) as work:
        (work / "mpi").mkdir()
        rows = [bench_mpi(args.mpi, args.workload, args.per_rank, work / "mpi"),
                bench_single(RANKS * args.per_rank, work)]
    print(f"{'':34} {'run:frz':>9} {'run:tot':>9} {'kill:frz':>9} {'kill:tot':>9} "
          f"{'restore':>10}   (ms; images in {args.dir}, {dump_restore.fs_type(args.dir)})")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
