"""A forked worker pool over one data set: what its image holds, what its restore takes, and the
memory the pool uses before the dump and after the restore.

    cd /work/main && PYTHONPATH=. python3 bench/forked_pool.py [--size 1G] [--children 4]
                                                                [--nested] [--dir /var/tmp]

tests/workloads/fork_shared.c CHILDREN SIZE GO: a root fills SIZE of anonymous memory and forks
CHILDREN children, which share it since the fork (each writes 16 pages of its own; the root
writes 32 anew); with --nested each child forks a helper, which shares it with the child.  A
kill-mode dump, then a detached restore (engine API in this process: no start-up counted).  The
pool's memory before the dump and after the restore: the sum over its processes of Pss
(/proc/PID/smaps_rollup: a page that N processes share counts 1/N in each, so the sum is the
memory the pool really uses) and of Rss (each counts it whole).  Then GO: each process checks
every page and the root must PASS.  Needs root, gcc and the native parts built.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compression import REPO, pages_bytes, parse_size, start

from hpccr.engine.dump import dump
from hpccr.engine.restore import restore

MIB = 1 << 20


def pool_memory(pids: list[int]) -> tuple[int, int]:
    """(sum of Pss, sum of Rss) of the processes, in bytes."""
    pss = rss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("Pss", "Rss"):
                kib = int(value.split()[0]) * 1024
                pss, rss = (pss + kib, rss) if name == "Pss" else (pss, rss + kib)
    return pss, rss


def descendants(pid: int) -> list[int]:
    """`pid` and its descendants."""
    found = [pid]
    for parent in found:
        found += [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text()
                  .split()]
    return found


def wait_for(what: str, done, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--nested", action="store_true", help="each child forks a helper")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="hpccr-forked-", dir=args.dir))
    try:
        binary = work / "fork_shared"
        subprocess.run(["gcc", "-O2", "-o", str(binary),
                        str(REPO / "tests" / "workloads" / "fork_shared.c"), "-lpthread"],
                       check=True)
        log, go, image = work / "pool.log", work / "go", work / "image"
        proc = start([str(binary), *(["-n"] if args.nested else []), str(args.children),
                      str(size // MIB), str(go)], log, "READY")
        pids = descendants(proc.pid)
        root = proc.pid
        before = pool_memory(pids)
        started = time.monotonic()
        result = dump(root, str(image), "kill")
        dump_s = time.monotonic() - started
        proc.wait()
        wait_for("the pool's pids", lambda: not any(os.path.exists(f"/proc/{p}") for p in pids))
        saved, _ = pages_bytes(image)
        shared_pages = sum(nr for runs in image.glob("forked-*.bin")
                           for _, nr in struct.iter_unpack("<QQ", runs.read_bytes()))
        started = time.monotonic()
        restore(str(image), detach=True)
        restore_s = time.monotonic() - started
        after = pool_memory(pids)
        go.touch()
        wait_for("PASS", lambda: "PASS" in log.read_text() or "FAIL" in log.read_text())
        os.waitpid(root, 0)
        verdict = "PASS" if "PASS" in log.read_text() else "FAIL"
        helpers = ", each with a helper" if args.nested else ""
        print(f"pool: {args.children} children{helpers} over {size / MIB:.0f} MiB, images in "
              f"{args.dir}")
        print(f"dump     {dump_s:7.3f} s (frozen {result.frozen_s:.3f} s), pages saved "
              f"{saved / MIB:8.1f} MiB; {shared_pages * 4096 / MIB:.1f} MiB more shared with "
              "a parent since fork, saved with the parent's")
        print(f"restore  {restore_s:7.3f} s")
        print(f"memory   Pss sum {before[0] / MIB:8.1f} MiB before the dump, "
              f"{after[0] / MIB:8.1f} MiB after the restore "
              f"(Rss sum {before[1] / MIB:.1f} / {after[1] / MIB:.1f} MiB)")
        print(f"verify   {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
