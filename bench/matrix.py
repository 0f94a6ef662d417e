"""Issue 12's whole matrix in one run, each figure beside the machine's limits measured in the
same run.

    cd /work/main && PYTHONPATH=. python3 bench/matrix.py [--sizes 16M,256M,2G] [--repeat 3]
                                                          [--percent 1,5,25] [--dir /var/tmp]

1. The machine's limits: process_vm_readv from a workload (the fastest a dump can copy memory
   out), memcpy between two buffers of this process, fresh memory (mmap MAP_POPULATE: what a
   restore pays before it writes a page), the image directory's write speed (page cache,
   O_DIRECT as hpccr writes pages, and fsync'd) and its O_DIRECT read speed (as a restore
   reads them).
2. For each size, what a user waits for: the `hpccr` commands themselves (`python -m hpccr`,
   start-up included), medians of --repeat rounds of `dump --leave-running`, `dump` (kill) and
   `restore --detach` of bench/workload.c, whose restored memory is then checked (OK), then
   `restore --detach --lazy` of the same image (lazy: until the command returns and the job
   runs; lazy:all: until the filler has placed every page and ended), checked too; frozen
   times as the commands print them, the commands' peak resident sets (hpccr's own memory);
   beside them the time the copy out takes at readv speed, the fresh memory of a restore
   at the speed measured (a restore gets it in the target, page by page as it is written, so
   it can beat that figure), the disk's time for the pages (written as a dump does, read as a
   restore does: the floor of each), and the issue's targets.
3. Incremental checkpoints of the largest size at each --percent of pages written
   (incremental.py's measure: engine API, tracking as `hpccr run --interval` does it).
4. Compression of random data (256 MiB or the largest size if smaller) and of the demo's heat
   grid (compression.py's measure: engine API).

Needs root, gcc and the native parts built.  About 3 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median

import compression
import incremental
from dump_restore import (
    Workload,
    compile_workload,
    fs_type,
    machine,
    pagecache_bandwidth,
    populate_bandwidth,
    populated_buffer,
    readv_bandwidth,
)
from forked_pool import wait_for
from own_memory import hpccr

MIB = 1 << 20
LIMIT_BATCH = 64 * MIB
MEMCPY_BYTES = 256 * MIB
DIRECT_READ_BYTES = 1024 * MIB
PR_SET_CHILD_SUBREAPER = 36
# The targets (seconds) per size: dump (kill) and restore, wall time of the command.
TARGETS = {16 * MIB: (0.15, 0.15), 256 * MIB: (0.3, 0.3), 2048 * MIB: (None, 0.4)}
FROZEN = re.compile(r"frozen ([0-9.]+) ms")


def memcpy_bandwidth() -> float:
    """MiB/s of memmove between two populated buffers of this process."""
    src, dst = populated_buffer(MEMCPY_BYTES), populated_buffer(MEMCPY_BYTES)
    try:
        a = ctypes.addressof(ctypes.c_char.from_buffer(src))
        b = ctypes.addressof(ctypes.c_char.from_buffer(dst))
        started = time.monotonic()
        ctypes.memmove(b, a, MEMCPY_BYTES)
        return MEMCPY_BYTES / MIB / (time.monotonic() - started)
    finally:
        src.close()
        dst.close()


def limits(exe: str, size: int, directory: str, work: Path) -> dict[str, float]:
    w = Workload(exe, size, str(work / "limits.log"))
    buf = populated_buffer(LIMIT_BATCH)
    try:
        found = {"readv": readv_bandwidth(w, buf)}
    finally:
        w.stop()
    found["memcpy"] = memcpy_bandwidth()
    found["fresh"] = populate_bandwidth(size)
    found["pcache"] = pagecache_bandwidth(directory, buf)
    found["direct"] = pagecache_bandwidth(directory, buf, direct=True)
    found["dread"] = direct_read_bandwidth(directory, buf)
    buf.close()
    found["fsync"] = compression.write_speed(directory) / MIB
    return found


def direct_read_bandwidth(directory: str, buf) -> float:
    """MiB/s of reading a file of 1 GiB with O_DIRECT (as a restore reads its pages), in
    `buf`-sized reads."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="direct-read-")
    try:
        for _ in range(DIRECT_READ_BYTES // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        started = time.monotonic()
        while os.readv(fd, [buf]):
            pass
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
        os.unlink(path)
    return DIRECT_READ_BYTES / MIB / elapsed


def frozen_ms(said: str) -> float:
    match = FROZEN.search(said)
    if not match:
        raise RuntimeError(f"no frozen time in {said!r}")
    return float(match.group(1))


def command_round(exe: str, size: int, work: Path) -> dict[str, float | str]:
    """One round of the three commands on a fresh workload; its figures and the verdict."""
    w = Workload(exe, size, str(work / "commands.log"))
    pid = w.pid
    try:
        run = hpccr("dump", pid, "-D", work / "running", "--leave-running")
        kill = hpccr("dump", pid, "-D", work / "killed")
        w.killed_by_dump()
        log = (work / "commands.log").read_bytes()  # as the image has it, for the second restore
        wait_for(f"pid {pid} free", lambda: not os.path.exists(f"/proc/{pid}"))
        back = hpccr("restore", "-D", work / "killed", "--detach")
        w.restored()  # a child of this process again (subreaper), reaped by w.stop()
        verdicts = {w.verify().split()[0]}
        w.stop()
        wait_for(f"pid {pid} free", lambda: not os.path.exists(f"/proc/{pid}"))
        (work / "commands.log").write_bytes(log)
        lazy, lazy_all = lazy_restore(work / "killed", pid)
        w.restored()
        verdicts.add(w.verify().split()[0])
        verdict = "/".join(sorted(verdicts))
    finally:
        w.stop()
        for image in ("running", "killed"):
            shutil.rmtree(work / image, ignore_errors=True)
    return {"run:frz": frozen_ms(run.said), "run:tot": run.wall * 1000,
            "kill:frz": frozen_ms(kill.said), "kill:tot": kill.wall * 1000,
            "restore": back.wall * 1000, "lazy": lazy * 1000, "lazy:all": lazy_all * 1000,
            "dump MiB": max(run.peak, kill.peak) / MIB, "rest. MiB": back.peak / MIB,
            "verify": verdict}


def lazy_restore(image: Path, pid: int) -> tuple[float, float]:
    """`restore --detach --lazy` of workload `pid`: the seconds until the command returns (the
    job runs) and until its filler has ended (every page in); the filler reaped, the workload
    a child of this process again."""
    started = time.monotonic()
    ran = hpccr("restore", "-D", image, "--detach", "--lazy")
    filler = parent_of(pid)  # until it ends
    wait_for("the lazy restore's filler to end", lambda: parent_of(pid) == os.getpid())
    done = time.monotonic() - started
    if filler != os.getpid():
        os.waitpid(filler, 0)
    return ran.wall, done


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def print_commands(exe: str, sizes: list[int], repeat: int, found: dict[str, float],
                   work: Path) -> bool:
    print(f"\nthe commands, wall time of `python -m hpccr ...` in ms (medians of {repeat}); "
          "frz: frozen, as printed;\npeak resident set of the commands in MiB; size / "
          "readv, size / fresh memory: the copy out\nand the fresh memory of a restore at the "
          "speeds measured above; disk:w, disk:r: size / direct write,\nsize / direct read "
          "(the disk's floor of a dump and of a restore)")
    names = ["run:frz", "run:tot", "kill:frz", "kill:tot", "restore", "lazy", "lazy:all",
             "dump MiB", "rest. MiB"]
    print(f"{'size':>6} " + " ".join(f"{n:>9}" for n in names)
          + f" {'verify':>7}  {'readv':>9} {'fresh':>9} {'disk:w':>9} {'disk:r':>9}"
          "  targets (dump, restore)")
    ok = True
    for size in sizes:
        rounds = [command_round(exe, size, work) for _ in range(repeat)]
        verdicts = {r["verify"] for r in rounds}
        ok &= verdicts == {"OK"}
        cells = " ".join(f"{median(r[n] for r in rounds):9.1f}" for n in names)
        dump_target, restore_target = TARGETS.get(size, (None, None))
        targets = ", ".join("-" if t is None else f"{t * 1000:.0f}"
                            for t in (dump_target, restore_target))
        print(f"{size // MIB:>4}M  {cells} {'/'.join(sorted(verdicts)):>7}  "
              f"{size / MIB / found['readv'] * 1000:9.1f} "
              f"{size / MIB / found['fresh'] * 1000:9.1f} "
              f"{size / MIB / found['direct'] * 1000:9.1f} "
              f"{size / MIB / found['dread'] * 1000:9.1f}  {targets}", flush=True)
        if size == max(sizes):
            ratio = median(r["run:tot"] for r in rounds) / median(r["kill:tot"] for r in rounds)
            print(f"{'':>6} --leave-running total / kill-mode total: {ratio:.2f} "
                  "(target <= 1.2)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16M,256M,2G")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the commands (3)")
    parser.add_argument("--percent", default="1,5,25", help="incremental: shares written")
    parser.add_argument("--dir", default="/var/tmp", help="image directory")
    args = parser.parse_args()
    if os.geteuid():
        print("matrix.py: needs root", file=sys.stderr)
        return 1
    # Restored workloads become this process's children once `hpccr restore` exits.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sizes = sorted(compression.parse_size(s) for s in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="hpccr-matrix-", dir=args.dir))
    try:
        exe = compile_workload(str(work))
        heat = work / "heat"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(heat),
                        str(compression.REPO / "demo" / "heat.c")], check=True)
        print(machine())
        # In a child: this process must stay small, since a command's peak resident set
        # (wait4) starts from it (subprocess forks with vfork; exec keeps the high-water mark).
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            found = pool.submit(limits, exe, max(sizes), str(work), work).result()
        print(f"limits: readv {found['readv']:.0f} MiB/s, memcpy {found['memcpy']:.0f} MiB/s, "
              f"fresh memory {found['fresh']:.0f} MiB/s; {args.dir} ({fs_type(args.dir)}): "
              f"page cache {found['pcache']:.0f} MiB/s, direct {found['direct']:.0f} MiB/s, "
              f"fsync'd {found['fsync']:.0f} MiB/s, direct read {found['dread']:.0f} MiB/s")
        ok = print_commands(exe, sizes, args.repeat, found, work)

        print(f"\nincremental, {max(sizes) // MIB} MiB (engine API, no start-up)")
        print(incremental.HEADER + "   targets at 5 %: bytes <= 10 %, time <= 15 %")
        for percent in (float(p) for p in args.percent.split(",")):
            print(incremental.measure(Path(exe), max(sizes), percent, work), flush=True)

        random_size = min(max(sizes), 256 * MIB)
        print("\ncompression (engine API, kill-mode dump and restore)")
        print(compression.HEADER)
        for row in compression.measure("random", [exe, str(random_size)], "READY", work):
            print(row, flush=True)
        for row in compression.measure("heat", [str(heat)], "step 30/", work):
            print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        print("matrix.py: a restored workload did not say OK", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
