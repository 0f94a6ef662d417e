"""hpccr's own memory while it dumps and restores: the peak resident set of the `hpccr dump`
and `hpccr restore` commands for jobs of several sizes.

    cd /work/main && PYTHONPATH=. python3 bench/own_memory.py [--sizes 16M,256M,2G]
                                                              [--dir /var/tmp]

For each size, bench/workload.c fills that much anonymous memory with pseudo-random data; then,
each a command of its own (`python -m hpccr`), a dump with --leave-running, a kill-mode dump and
a detached restore of that image, whose workload checks its memory (SIGUSR1: OK).  The peak
resident set of each command is wait4's ru_maxrss: the command's own, since it reaps none of the
processes it restores.  `python -m hpccr --help` gives the interpreter's and imports' share.
Needs root, gcc and the native parts built.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from compression import REPO, parse_size, start
from forked_pool import wait_for

MIB = 1 << 20


class Ran(NamedTuple):
    wall: float  # seconds
    peak: int  # bytes: the command's peak resident set
    said: str  # what it printed (its messages go to stderr)


def hpccr(*args: object) -> Ran:
    """Run `hpccr ARGS` (python -m hpccr) from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "hpccr", *map(str, args)], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"hpccr {' '.join(map(str, args))}: exit {proc.returncode}: "
                               f"{err.read().decode(errors='replace').strip()}")
        said = b""
        for stream in (out, err):
            stream.seek(0)
            said += stream.read()
        return Ran(elapsed, usage.ru_maxrss * 1024, said.decode(errors="replace"))


def measure(binary: Path, size: int, work: Path) -> tuple[list[Ran], str]:
    """What the running dump, the kill dump and the restore took (Ran); the verdict."""
    log = work / f"workload-{size}.log"
    proc = start([str(binary), str(size)], log, "READY")
    pid = proc.pid
    figures = [hpccr("dump", pid, "-D", work / "running", "--leave-running"),
               hpccr("dump", pid, "-D", work / "killed")]
    proc.wait()
    wait_for(f"pid {pid} free", lambda: not os.path.exists(f"/proc/{pid}"))
    figures.append(hpccr("restore", "-D", work / "killed", "--detach"))
    lines = len(log.read_text().splitlines())
    os.kill(pid, signal.SIGUSR1)
    wait_for("the restored workload's check", lambda: len(log.read_text().splitlines()) > lines)
    verdict = log.read_text().splitlines()[-1].split()[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(f"pid {pid} free", lambda: not os.path.exists(f"/proc/{pid}"))
    for image in ("running", "killed"):
        shutil.rmtree(work / image)
    return figures, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16M,256M,2G")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpccr-memory-", dir=args.dir))
    failed = False
    try:
        binary = work / "workload"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "bench" / "workload.c")],
                       check=True)
        baseline = hpccr("--help").peak
        print(f"peak resident set of the command (wall time); `hpccr --help`: "
              f"{baseline / MIB:.1f} MiB; images in {args.dir}")
        print(f"{'size':>9} {'dump --leave-running':>22} {'dump (kill)':>22} "
              f"{'restore --detach':>22}  verify")
        for text in args.sizes.split(","):
            size = parse_size(text)
            figures, verdict = measure(binary, size, work)
            failed |= verdict != "OK"
            cells = [f"{ran.peak / MIB:7.1f} MiB ({ran.wall:6.3f} s)" for ran in figures]
            print(f"{size / MIB:5.0f} MiB {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}  "
                  f"{verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
