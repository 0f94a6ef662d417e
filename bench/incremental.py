"""Incremental checkpoints: what a periodic checkpoint costs once a share of the pages changed.

    cd /work/main && PYTHONPATH=. python3 bench/incremental.py [--size 2G] [--percent 1,5,25]
                                                               [--dir /var/tmp]

For each share: bench/workload.c with SIZE of random data; a running dump with a series'
tracking (engine/tracking.py, as `hpccr run --interval` takes them: the first is full), then
the workload writes new data into that share of its pages (chosen at random), then the next
running dump (incremental); then the workload is killed and the incremental image restored
through its chain, and must say OK. Prints per share the bytes each dump wrote, its wall time
and frozen time, and the incremental one's share of the full one's, and the restore's time.
Engine API in this process (no start-up counted). Needs root, gcc and the native parts built.
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

from compression import REPO, pages_bytes, parse_size, start, write_speed

from hpccr.engine.dump import dump
from hpccr.engine.restore import restore
from hpccr.engine.tracking import Tracking

HEADER = (f"{'written':>8} {'full: bytes':>13} {'time':>9} {'frozen':>10} "
          f"{'incr.: bytes':>13} {'time':>9} {'frozen':>10} {'bytes':>8} {'time':>8} "
          f"{'restore':>9}")


def wait_line(log: Path, prefix: str, count: int, what: str) -> None:
    deadline = time.monotonic() + 120
    while sum(line.startswith(prefix) for line in log.read_text().splitlines()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what}: {log.read_text()}")
        time.sleep(0.01)


def measure(binary: Path, size: int, percent: float, work: Path) -> str:
    log = work / f"workload-{percent}.log"
    proc = start([str(binary), str(size), str(percent)], log, "READY")
    series = work / f"series-{percent}"
    series.mkdir()
    tracking = Tracking(full_every=100)
    figures = []
    try:
        for number in (1, 2):
            if number == 2:
                os.kill(proc.pid, signal.SIGUSR2)
                wait_line(log, "WROTE", 1, "writes")
            image = series / f"ckpt-{number:04d}"
            started = time.monotonic()
            result = dump(proc.pid, str(image), "running", tracking=tracking)
            figures.append((pages_bytes(image)[1], time.monotonic() - started, result.frozen_s))
        proc.kill()
        proc.wait()
        started = time.monotonic()
        restore(str(series / "ckpt-0002"), detach=True)
        restore_s = time.monotonic() - started
        os.kill(proc.pid, signal.SIGUSR1)
        wait_line(log, "OK", 1, "OK from the restored workload")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        tracking.reset()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(series, ignore_errors=True)
    (full_b, full_s, full_f), (inc_b, inc_s, inc_f) = figures
    return (f"{percent:6.1f} % {full_b / 2**20:9.1f} MiB {full_s:7.3f} s {full_f * 1000:7.1f} ms"
            f" {inc_b / 2**20:9.1f} MiB {inc_s:7.3f} s {inc_f * 1000:7.1f} ms"
            f" {inc_b / full_b * 100:6.1f} % {inc_s / full_s * 100:6.1f} % {restore_s:7.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="the workload's memory (2G)")
    parser.add_argument("--percent", default="1,5,25", help="shares of pages written (1,5,25)")
    parser.add_argument("--dir", default="/var/tmp", help="image directory's file system")
    args = parser.parse_args()
    if os.geteuid():
        print("incremental.py: needs root", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="hpccr-bench-incr-", dir=args.dir))
    try:
        binary = work / "workload"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "bench" / "workload.c")],
                       check=True)
        print(f"cpu: {os.cpu_count()} cores; {args.dir}: write "
              f"{write_speed(str(work)) / 2**20:.0f} MiB/s (fsync'd); "
              f"workload {parse_size(args.size) >> 20} MiB")
        print(HEADER)
        for percent in (float(p) for p in args.percent.split(",")):
            print(measure(binary, parse_size(args.size), percent, work), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
