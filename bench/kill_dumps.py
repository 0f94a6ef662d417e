#!/usr/bin/env python3
"""How often does a `hpccr dump` SIGKILLed part-way lose the job it was dumping?

Starts tests/workloads/busy.c (SIZE MiB, two threads, checking its own memory and signal mask),
then KILLS times: starts `hpccr dump PID --leave-running` (or the kill mode) from the checkout
given by --tree, SIGKILLs its whole process group after a random delay, and looks at the job:
dead (and of which signal), stopped, still traced, stuck (no progress), or fine.  A lost job is
started again.  Prints one line per bad outcome and the totals.

    python3 bench/kill_dumps.py [--tree DIR] [--size 256] [--kills 100] [--delays 0.02,1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def state(pid: int, tid: int) -> tuple[str, str]:
    """(state letter, TracerPid) of one thread."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return fields["State"][0], fields["TracerPid"].strip()


def rounds(progress: Path) -> int:
    text = progress.read_text().strip()
    return int(text) if text else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(REPO), help="hpccr checkout to run")
    parser.add_argument("--size", type=int, default=256, help="MiB of job memory")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--delays", default="0.02,1", help="MIN,MAX seconds before the kill")
    parser.add_argument("--kill-mode", action="store_true", help="dump without --leave-running")
    args = parser.parse_args()
    low, high = (float(x) for x in args.delays.split(","))
    work = Path(tempfile.mkdtemp(prefix="kill-dumps-"))
    binary = work / "busy"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, REPO / "tests/workloads/busy.c"],
                   check=True)
    env = dict(os.environ, PYTHONPATH=args.tree)
    progress = work / "progress"

    def start() -> subprocess.Popen:
        log = open(work / "job.log", "ab")
        job = subprocess.Popen([binary, str(args.size), progress], stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL, start_new_session=True)
        while b"READY" not in (work / "job.log").read_bytes():
            time.sleep(0.01)
        return job

    outcomes: Counter[str] = Counter()
    rng = random.Random()
    job = start()
    for i in range(args.kills):
        delay = rng.uniform(low, high)
        mode = [] if args.kill_mode else ["--leave-running"]
        dump = subprocess.Popen([sys.executable, "-m", "hpccr", "dump", str(job.pid), "-D",
                                 work / f"img-{i}", *mode], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            dump.wait(timeout=delay)
            outcome = "dump finished first"
        except subprocess.TimeoutExpired:
            os.killpg(dump.pid, signal.SIGKILL)
            dump.wait()
            outcome = "killed"
        shutil.rmtree(work / f"img-{i}", ignore_errors=True)
        if outcome == "dump finished first" and not mode:
            job.wait()
            outcomes[outcome] += 1
            job = start()
            continue
        before = rounds(progress)
        deadline = time.monotonic() + 10
        while job.poll() is None and rounds(progress) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        bad = None
        if job.poll() is not None:
            code = job.returncode
            bad = f"job died: {signal.Signals(-code).name if code < 0 else f'exit {code}'}"
        else:
            threads = [state(job.pid, int(t)) for t in os.listdir(f"/proc/{job.pid}/task")]
            if any(tracer != "0" for _, tracer in threads):
                bad = "job still traced"
            elif any(letter in "Tt" for letter, _ in threads):
                bad = "job stopped"
            elif rounds(progress) < before + 3:
                bad = "job makes no progress"
        if bad:
            print(f"kill {i} after {delay:.3f} s: {bad}", flush=True)
            outcomes[bad] += 1
            if job.poll() is None:
                job.kill()
                job.wait()
            job = start()
        else:
            outcomes[outcome + ", job fine"] += 1
    os.kill(job.pid, signal.SIGTERM)
    job.wait()
    last = (work / "job.log").read_text().splitlines()[-1]
    print(f"totals over {args.kills} dumps: {dict(outcomes)}; the last job said {last}")
    print(f"work directory: {work}")


if __name__ == "__main__":
    main()
