"""A Python multiprocessing.Pool job: 3 forked workers square 240 numbers, 20 ms each, through
the pool's pipes, its POSIX semaphores (shared memory) and its three handler threads.

usage: pool.py

Prints its PID and READY once 12 results are in, then the remaining results arrive; PASS only if
every result is right and in order, with the same pid after a restore, and the workers the same
processes as before (their pids are printed as WORKERS)."""

import multiprocessing
import os
import sys
import time

N = 240


def square(i: int) -> tuple[int, int]:
    time.sleep(0.02)
    return i * i, os.getpid()


def main() -> int:
    pid = os.getpid()
    print("PID", pid, flush=True)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        workers = sorted(p.pid for p in pool._pool)
        print("WORKERS", *workers, flush=True)
        results, seen = [], set()
        for n, (value, worker) in enumerate(pool.imap(square, range(N))):
            results.append(value)
            seen.add(worker)
            if n == 11:
                print("READY", flush=True)
        still = sorted(p.pid for p in pool._pool)
    print("PID", os.getpid(), flush=True)
    failures = []
    if results != [i * i for i in range(N)]:
        failures.append("wrong results")
    if os.getpid() != pid:
        failures.append(f"pid {pid} became {os.getpid()}")
    if still != workers or not seen <= set(workers):
        failures.append(f"workers {workers} became {still} (results from {sorted(seen)})")
    print("FAIL " + "; ".join(failures) if failures else "PASS", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
