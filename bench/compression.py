"""Compressed checkpoints: what zstd (hpccr dump --compress) costs and saves.

    cd /work/main && PYTHONPATH=. python3 bench/compression.py [--size 256M] [--dir /var/tmp]

Two workloads: bench/workload.c (SIZE of random data: the worst case) and the demo's heat
grid (demo/heat.c: a 2-D floating-point field, ~150 MiB, a real program's memory).  For each,
a kill-mode dump with and without compression (engine API, in this process: no start-up
counted), then a restore of each image; prints the image's bytes, the ratio, the dump's frozen
time and its throughput (bytes of memory per second frozen), the restore time, and beside
them the machine's own zstd speed on the same pages (level 3, all cores, in memory) and the
image directory's write speed.  Needs root, gcc and the native parts built in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpccr.engine.dump import dump
from hpccr.engine.restore import restore
from hpccr.image.pages import ZSTD_LEVEL

REPO = Path(__file__).resolve().parent.parent
HEADER = (f"{'workload':<10} {'comp.':<5} {'memory':>12} {'stored':>12} {'ratio':>7} "
          f"{'frozen':>11} {'throughput':>13} {'restore':>11}")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def start(argv: list[str], log: Path, ready: str) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while ready not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[0]} did not start: {log.read_text()}")
        time.sleep(0.02)
    return proc


def pages_bytes(image: Path) -> tuple[int, int]:
    """(bytes of memory saved, bytes of the pages files as stored)."""
    stored = sum(f.stat().st_size for f in image.glob("pages-*"))
    meta = json.loads((image / "image.json").read_text())
    return sum(p.get("nr_pages", 0) for p in meta["processes"]) * 4096, stored


def zstd_speed(image: Path) -> float:
    """The machine's zstd speed on these very pages (bytes in per second), in memory."""
    import zstandard

    data = b"".join(f.read_bytes() for f in sorted(image.glob("pages-*.img")))
    started = time.monotonic()
    zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compress(data)
    return len(data) / (time.monotonic() - started)


def write_speed(directory: str, size: int = 256 << 20) -> float:
    path = Path(directory) / "hpccr-bench-write"
    buf = os.urandom(1 << 20)
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(buf)
        os.fsync(f.fileno())
    elapsed = time.monotonic() - started
    path.unlink()
    return size / elapsed


def measure(name: str, argv: list[str], ready: str, work: Path) -> list[str]:
    rows = []
    reference = None
    for compress in (False, True):
        log = work / f"{name}.log"
        proc = start(argv, log, ready)
        image = work / f"{name}-{'zstd' if compress else 'plain'}"
        result = dump(proc.pid, str(image), "kill", compress=compress)
        proc.wait()
        saved, stored = pages_bytes(image)
        if not compress:
            reference = zstd_speed(image)
        started = time.monotonic()
        restore(str(image), detach=True)
        restore_s = time.monotonic() - started
        os.kill(proc.pid, 9)
        os.waitpid(proc.pid, 0)
        speed = saved / result.frozen_s / 2**20
        rows.append(f"{name:<10} {'zstd' if compress else 'none':<5} {saved / 2**20:8.1f} MiB "
                    f"{stored / 2**20:8.1f} MiB {saved / max(stored, 1):6.2f}x "
                    f"{result.frozen_s * 1000:8.1f} ms {speed:8.0f} MiB/s "
                    f"{restore_s * 1000:8.1f} ms")
        shutil.rmtree(image)
    rows.append(f"{'':<10} zstd alone on these pages (level {ZSTD_LEVEL}, all cores, in memory): "
                f"{reference / 2**20:.0f} MiB/s")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="random workload's size (256M)")
    parser.add_argument("--dir", default="/var/tmp", help="image directory's file system")
    args = parser.parse_args()
    if os.geteuid():
        print("compression.py: needs root (restore gives the process its pid back)",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="hpccr-bench-zstd-", dir=args.dir))
    try:
        for src in (REPO / "bench" / "workload.c", REPO / "demo" / "heat.c"):
            subprocess.run(["gcc", "-O2", "-pthread", "-o", str(work / src.stem), str(src)],
                           check=True)
        print(f"cpu: {os.cpu_count()} cores; {args.dir}: write "
              f"{write_speed(str(work)) / 2**20:.0f} MiB/s (fsync'd)")
        print(HEADER)
        for row in measure("random", [str(work / "workload"), str(parse_size(args.size))],
                           "READY", work):
            print(row, flush=True)
        for row in measure("heat", [str(work / "heat")], "step 30/", work):
            print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
