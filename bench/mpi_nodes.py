"""A coordinated checkpoint of an MPI job on two nodes (2 ranks on each), and its restart on the
nodes swapped.

    cd /work/main
    PYTHONPATH=.:tests .venv/bin/python bench/mpi_nodes.py [--per-rank 256M] [--dir /var/tmp]

Needs root, scripts/setup.sh done and Open MPI.  Two nodes are made of network namespaces
joined by a bridge (tests/multinode.py); each part of the job runs under `hpccr run -D SERIES`
in its node, the ranks (tests/workloads/mpi/ring.c, each with two message buffers making
--per-rank of memory) started with mpirun in one part and through hpccr-launch in the other.
The part at slot 0 checkpoints both every 30 s while the job runs (hpccr/mpi/coordinate.py);
printed for the first checkpoint: each part's frozen time and dump time, the freeze skew between
the parts, the time they waited for each other frozen, and the time to the commit; then both
parts are killed and the checkpoint restored on the nodes swapped: the time until the job prints
its next step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dump_restore  # noqa: E402 - bench/dump_restore.py, beside this file
from mpi import TIMEOUT, scratch, wait_for  # noqa: E402 - bench/mpi.py, beside this file
from multinode import Nodes, part_env  # noqa: E402 - tests/multinode.py

REPO = Path(__file__).resolve().parent.parent
RING = REPO / "tests" / "workloads" / "mpi" / "ring.c"
LAUNCH_SERVER = [str(Path(sys.executable).with_name("hpccr-launch")), "--serve"]
ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
def steps(log: Path) -> int:
    return sum(line.startswith("STEP ") for line in log.read_text(errors="replace").splitlines())


def job_pid(log: Path) -> int | None:
    return next((int(line.split()[-1]) for line in log.read_text(errors="replace").splitlines()
                 if line.startswith("hpccr run: job pid ")), None)


def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env={**os.environ, **ROOT, **env})


def hpccr(*args: object) -> list[str]:
    return [sys.executable, "-m", "hpccr", *map(str, args)]


def bench(per_rank: int, work: Path) -> None:
    binary = work / "ring"
    subprocess.run(["mpicc.openmpi", "-O2", "-o", binary, RING], check=True)
    nodes, job_id, series = Nodes(), random.randrange(1, 1 << 20), work / "series"
    procs: list[subprocess.Popen] = []
    try:
        server_log, ranks_log = work / "server.log", work / "ranks.log"
        procs.append(start([*nodes.wrap(1), *hpccr("run", "-D", series, "--", *LAUNCH_SERVER)],
                           server_log, part_env(job_id, 1, nodes.addresses)))
        wait_for(lambda: "READY" in server_log.read_text(), "the launch server")
        ranks = ["mpirun.openmpi", "--oversubscribe", "-np", "4", "-host",
                 f"job{job_id}-0:2,job{job_id}-1:2", binary, "100000000", per_rank // 2]
        procs.append(start([*nodes.wrap(0), *hpccr("run", "-D", series, "--interval", "30s",
                                                  "--", *ranks)],
                           ranks_log, part_env(job_id, 0, nodes.addresses)))
        wait_for(lambda: (series / "latest").exists(), "the first coordinated checkpoint")
        checkpoint = series / os.readlink(series / "latest")
        figures = json.loads((checkpoint / "coordination.json").read_text())
        timing = [json.loads((checkpoint / f"part-{slot}" / "image.json").read_text())["timing"]
                  for slot in range(2)]
        for log in (ranks_log, server_log):
            os.kill(job_pid(log), signal.SIGKILL)  # a part's pid 1: the whole part goes
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
        done = steps(ranks_log)
        started = time.monotonic()
        swapped = nodes.addresses[::-1]
        for slot, node, log in ((1, 0, server_log), (0, 1, ranks_log)):
            procs.append(start([*nodes.wrap(node), *hpccr("restore", "-D", series)], log,
                               part_env(job_id, slot, swapped)))
        wait_for(lambda: steps(ranks_log) > done, "the restored job's next step")
        restart_s = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        nodes.remove()
    memory = dump_restore.human(4 * per_rank)
    print(f"Open MPI, 2 nodes x 2 ranks x {dump_restore.human(per_rank)} ({memory} in all), "
          "one coordinated checkpoint left running:")
    for slot, part in enumerate(timing):
        print(f"  part {slot}: frozen {part['frozen_s'] * 1e3:8.0f} ms, "
              f"dump {part['dump_s'] * 1e3:8.0f} ms")
    print(f"  freeze skew {figures['freeze_skew_s'] * 1e3:.1f} ms, waited for all frozen "
          f"{figures['frozen_wait_s'] * 1e3:.1f} ms, commit after {figures['commit_s']:.2f} s")
    print(f"  restart on the nodes swapped, to the next step: {restart_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-rank", type=dump_restore.parse_size, default="256M")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    with scratch("hpccr-bench-nodes-", args.dir) as work:
        bench(args.per_rank, work)


if __name__ == "__main__":
    main()
