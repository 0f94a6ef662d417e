#!/usr/bin/env python3
"""Benchmark of hpccr dump and restore against the memory-copy limits of this machine.

For each size a real C workload (bench/workload.c) fills that much anonymous memory with
pseudo-random data; the script measures the raw process_vm_readv bandwidth from it, the page-cache
write bandwidth of the image file systems, then dumps it (--leave-running and kill) into the image
directory and into /dev/shm, restores every killed image and has the restored workload verify its
checksum.  Run as root from the repository:

    PYTHONPATH=. python3 bench/dump_restore.py [--sizes 256M,2G] [--dir DIR] [--repeat N]
                                               [--profile DIR]

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import io
import mmap
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from hpccr import native
from hpccr.engine.dump import dump
from hpccr.engine.restore import restore

MiB = 1 << 20
GiB = 1 << 30
BATCH = 64 * MiB  # process_vm_readv batch, as hpccr's own copy loop
PAGECACHE_BYTES = 1 * GiB
SHM = "/dev/shm"
WORKLOAD_SRC = Path(__file__).with_name("workload.c")
READY_TIMEOUT_S = 300
VERIFY_TIMEOUT_S = 120
# The targets for a 2 GiB process, and CRIU 4.2 measured on this machine.
TARGET_SIZE = 2 * GiB
TARGET_FROZEN_S, TARGET_RESTORE_S = 0.7, 0.4
CRIU_FROZEN_S, CRIU_RESTORE_S = 2.3, 0.8


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


def fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (longest mount point prefix)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fstype
    return kind


def populated_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def compile_workload(build_dir: str) -> str:
    exe = os.path.join(build_dir, "workload")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", exe, str(WORKLOAD_SRC)], check=True)
    return exe


class Workload:
    """The C workload: started with its output in a log file; verified on SIGUSR1."""

    def __init__(self, exe: str, size: int, log: str):
        self.log = log
        with open(log, "w") as out:  # close_fds: no stray pipe may reach the dumped process
            self.popen: subprocess.Popen | None = subprocess.Popen(
                [exe, str(size)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.pid = self.popen.pid
        self.alive = True
        ready = self._next_line(0, READY_TIMEOUT_S).split()
        if not ready or ready[0] != "READY":
            raise RuntimeError(f"workload did not start: {' '.join(ready)}")
        self.addr, self.size = int(ready[1], 16), int(ready[2])

    def _lines(self) -> list[str]:
        with open(self.log) as f:
            return f.read().split("\n")[:-1]

    def _exited(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        return os.waitpid(self.pid, os.WNOHANG)[0] == self.pid

    def _next_line(self, seen: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._lines()
            if len(lines) > seen:
                return lines[seen]
            if self._exited():
                self.alive = False
                raise RuntimeError(f"workload {self.pid} exited: {self._lines()}")
            time.sleep(0.02)
        raise RuntimeError(f"workload {self.pid} gave no output within {timeout} s")

    def verify(self) -> str:
        """Ask the (restored) workload to recompute its checksum; its "OK ..." or "BAD ..."."""
        seen = len(self._lines())
        os.kill(self.pid, signal.SIGUSR1)
        return self._next_line(seen, VERIFY_TIMEOUT_S)

    def killed_by_dump(self) -> None:
        """The dump killed it and reaped it as its tracer; the pid is free for the restore."""
        self.alive = False
        if self.popen is not None:
            self.popen.wait()  # nothing left to reap: only settles the Popen object
            self.popen = None

    def restored(self) -> None:
        """restore() gave it back, with the same pid, as a child of this process."""
        self.alive = True

    def stop(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self.popen is not None:
            self.popen.kill()
            self.popen.wait()
            return
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def readv_bandwidth(w: Workload, buf: mmap.mmap) -> float:
    """MiB/s of process_vm_readv over the workload's memory, 64 MiB per call."""
    addrs = native.ffi.new("unsigned long long[1]")
    lens = native.ffi.new("unsigned long long[1]")
    started = time.monotonic()
    for offset in range(0, w.size, BATCH):
        addrs[0] = w.addr + offset
        lens[0] = min(BATCH, w.size - offset)
        native.read_ranges(w.pid, addrs, lens, 1, buf)
    return w.size / MiB / (time.monotonic() - started)


def populate_bandwidth(size: int) -> float:
    """MiB/s of mmap(MAP_POPULATE) of `size` fresh anonymous bytes: what restore pays to get
    memory before it can write the pages (page allocation and zeroing)."""
    started = time.monotonic()
    populated_buffer(size).close()
    return size / MiB / (time.monotonic() - started)


def pagecache_bandwidth(directory: str, buf: mmap.mmap, direct: bool = False) -> float:
    """MiB/s of writing 1 GiB into a new file of `directory`, without fsync; `direct`: with
    O_DIRECT (hpccr's pages), past the page cache."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="pagecache-")
    try:
        if direct:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        started = time.monotonic()
        for _ in range(PAGECACHE_BYTES // len(buf)):
            view, done = memoryview(buf), 0
            while done < len(view):
                done += os.write(fd, view[done:])
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
        os.unlink(path)
    return PAGECACHE_BYTES / MiB / elapsed


def image_bytes(directory: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())


@dataclass
class Figures:
    """Every sample of one (size, image directory) pair; reported as medians."""

    running_frozen: list[float] = field(default_factory=list)
    running_total: list[float] = field(default_factory=list)
    kill_frozen: list[float] = field(default_factory=list)
    kill_total: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)


def timed_dump(w: Workload, image: str, mode: str, fig: Figures) -> None:
    started = time.monotonic()
    result = dump(w.pid, image, mode)
    total = time.monotonic() - started
    fig.image.append(image_bytes(result.path))
    if mode == "running":
        fig.running_frozen.append(result.frozen_s)
        fig.running_total.append(total)
    else:
        w.killed_by_dump()
        fig.kill_frozen.append(result.frozen_s)
        fig.kill_total.append(total)


def check(w: Workload, image: str) -> str:
    """Have the restored workload verify its memory; shout if it does not say OK."""
    verdict = w.verify()
    if not verdict.startswith("OK"):
        print(f"\n!!! FAILURE: the workload restored from {image} reports: {verdict}\n",
              file=sys.stderr, flush=True)
    return verdict


def timed_restore(w: Workload, image: str, fig: Figures) -> None:
    started = time.monotonic()
    restore(image, detach=True)
    fig.restore.append(time.monotonic() - started)
    w.restored()
    fig.verdicts.append(check(w, image))


def report_profile(prof: cProfile.Profile, path: str) -> None:
    prof.dump_stats(path)
    text = io.StringIO()
    pstats.Stats(path, stream=text).sort_stats("tottime").print_stats(15)
    print(f"\n--- {os.path.basename(path)}: the 15 functions with the most own time")
    print(text.getvalue().split("\n\n", 2)[-1].rstrip())


def profile_round(w: Workload, image: str, out_dir: str, fig: Figures) -> None:
    """One more kill dump and restore under cProfile, kept out of the timed figures (only the
    verification verdict is recorded)."""
    label = human(w.size)
    prof = cProfile.Profile()
    prof.runcall(dump, w.pid, image, "kill")
    w.killed_by_dump()
    report_profile(prof, os.path.join(out_dir, f"dump-{label}.pstats"))
    prof = cProfile.Profile()
    prof.runcall(restore, image, True)
    w.restored()
    report_profile(prof, os.path.join(out_dir, f"restore-{label}.pstats"))
    fig.verdicts.append(check(w, image))
    print(f"--- restored workload after the profiled round: {fig.verdicts[-1]}")


def run_size(exe: str, size: int, dirs: list[str], repeat: int,
             profile_dir: str | None) -> tuple[dict[str, list[float]], dict[str, Figures]]:
    """All measurements of one workload size; every image is removed once measured."""
    label = human(size)
    w = Workload(exe, size, os.path.join(dirs[0], f"workload-{label}.log"))
    figs = {d: Figures() for d in dirs}
    limits: dict[str, list[float]] = {"readv": [], "populate": []}
    buf = populated_buffer(BATCH)
    try:
        for _ in range(repeat):
            limits["readv"].append(readv_bandwidth(w, buf))
            limits["populate"].append(populate_bandwidth(size))
            for d in dirs:
                image = os.path.join(d, f"image-{label}")
                timed_dump(w, image, "running", figs[d])
                shutil.rmtree(image)
            for d in dirs:
                image = os.path.join(d, f"image-{label}")
                timed_dump(w, image, "kill", figs[d])
                timed_restore(w, image, figs[d])
                shutil.rmtree(image)
        if profile_dir:
            image = os.path.join(dirs[0], f"image-{label}")
            profile_round(w, image, profile_dir, figs[dirs[0]])
            shutil.rmtree(image)
    finally:
        w.stop()
        buf.close()
    return limits, figs


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   "?")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().split("[")[1].split("]")[0]
    return f"Linux {os.uname().release}, {cpu}, {os.cpu_count()} CPUs, THP {thp}"


def ms(samples: list[float]) -> str:
    return f"{median(samples) * 1000:.0f}"


def mib_s(size: int, samples: list[float]) -> str:
    return f"{size / MiB / median(samples):.0f}"


def spread(samples: list[float]) -> str:
    return " ".join(f"{s * 1000:.0f}" for s in samples)


COLUMNS = (  # (format of the cells, name, unit)
    (">5", "size", ""), ("<22", "images on", ""), (">6", "readv", "MiB/s"),
    (">6", "popul.", "MiB/s"), (">6", "pcache", "MiB/s"), (">7", "run:frz", "ms"),
    (">7", "run:tot", "ms"), (">8", "kill:frz", "ms"), (">8", "kill:tot", "ms"),
    (">6", "dump", "MiB/s"), (">6", "image", "MiB"), (">7", "restore", "ms"),
    (">6", "rest.", "MiB/s"), (">6", "verify", ""),
)


def row(*cells: str) -> str:
    return " ".join(format(cell, spec) for (spec, *_), cell in
                    zip(COLUMNS, cells, strict=False)).rstrip()


def reference_row(size: int, name: str, frozen_s: float, restore_s: float) -> str:
    scale = size / TARGET_SIZE
    if scale != 1:
        name += " (linear)"
    frozen, rest = f"{frozen_s * scale * 1000:.0f}", f"{restore_s * scale * 1000:.0f}"
    return row("", name, "", "", "", frozen, "", frozen, "", "", "", rest)


def print_report(results, pagecache: dict[str, list[float]], repeat: int) -> None:
    print(f"\nhpccr dump/restore benchmark -- {machine()}")
    print(f"medians of {repeat} run(s).  readv: process_vm_readv from the workload; popul.: "
          "mmap(MAP_POPULATE)\nof fresh memory; pcache: page-cache write of 1 GiB, no fsync; "
          "run: dump --leave-running;\nkill: dump that kills (then restored and verified); "
          "frz: frozen time; tot: wall time of dump()\n")
    print(row(*(name for _, name, _ in COLUMNS)))
    print(row(*(unit for *_, unit in COLUMNS)))
    samples = []
    for size, limits, figs in results:
        print("-" * len(row(*(name for _, name, _ in COLUMNS))))
        for d, f in figs.items():
            where = f"{os.path.dirname(d)} ({fs_type(d)})"
            verdicts = "/".join(sorted({v.split()[0] for v in f.verdicts}))
            print(row(human(size), where, f"{median(limits['readv']):.0f}",
                      f"{median(limits['populate']):.0f}", f"{median(pagecache[d]):.0f}",
                      ms(f.running_frozen), ms(f.running_total), ms(f.kill_frozen),
                      ms(f.kill_total), mib_s(size, f.kill_total),
                      f"{median(f.image) / MiB:.0f}", ms(f.restore), mib_s(size, f.restore),
                      verdicts))
            samples.append(f"{human(size):>5} {where:<22} run:frz {spread(f.running_frozen)} | "
                           f"kill:frz {spread(f.kill_frozen)} | restore {spread(f.restore)}")
        print(reference_row(size, "target", TARGET_FROZEN_S, TARGET_RESTORE_S))
        print(reference_row(size, "CRIU 4.2", CRIU_FROZEN_S, CRIU_RESTORE_S))
    print("\nevery sample (ms):")
    print("\n".join(samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256M,2G", help="workload sizes (default 256M,2G)")
    parser.add_argument("--dir", default="/var/tmp",
                        help="where the default images go (default /var/tmp); /dev/shm is "
                             "always measured too")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile one more kill dump and restore per size with "
                             "cProfile; .pstats files are written to DIR")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("hpccr restores exact pids: run as root")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    scratch = [tempfile.mkdtemp(prefix="hpccr-bench-"),
               tempfile.mkdtemp(prefix="hpccr-bench-", dir=args.dir),
               tempfile.mkdtemp(prefix="hpccr-bench-", dir=SHM)]
    build, dirs = scratch[0], scratch[1:]
    try:
        exe = compile_workload(build)
        buf = populated_buffer(BATCH)
        pagecache = {d: [pagecache_bandwidth(d, buf) for _ in range(args.repeat)] for d in dirs}
        buf.close()
        results = []
        for size in sizes:
            print(f"measuring {human(size)} ...", file=sys.stderr, flush=True)
            results.append((size, *run_size(exe, size, dirs, args.repeat, args.profile)))
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
    print_report(results, pagecache, args.repeat)
    bad = [v for _, _, figs in results for f in figs.values() for v in f.verdicts
           if not v.startswith("OK")]
    if bad:
        print(f"\n!!! FAILURE: {len(bad)} restore(s) did not verify: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
