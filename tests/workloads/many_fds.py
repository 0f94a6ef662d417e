"""Thousands of descriptors on one inode: 1500 opens of /dev/null (every fifth write-only),
every third one dup'ed once.

usage: many_fds.py DIR

Prints READY, waits until DIR/go exists (the test makes it once the checkpoint is restored),
then checks with kcmp(KCMP_FILE) that each dup is still one open file description with its
original, and that the 1500 opens are still 1500 descriptions (sorted in kcmp's order, no two
neighbours are one) with their access modes; PASS, or FAIL and why.  PID lines show its pid
before and after.
"""

import ctypes
import fcntl
import functools
import itertools
import os
import resource
import sys
import time

COUNT = 1500
SYS_KCMP, KCMP_FILE = 312, 0
libc = ctypes.CDLL(None, use_errno=True)


def kcmp(a: int, b: int) -> int:
    """0: one description; -1 / 1: kcmp's order of two others."""
    pid = os.getpid()
    return {0: 0, 1: -1, 2: 1}[libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, a, b)]


def mode(i: int) -> int:
    return os.O_WRONLY if i % 5 == 0 else os.O_RDONLY


def check(opened: list[int], dups: dict[int, int]) -> str | None:
    for fd, dup in dups.items():
        if kcmp(fd, dup) != 0:
            return f"fd {dup} is no longer a dup of fd {fd}"
    ordered = sorted(opened, key=functools.cmp_to_key(kcmp))
    for first, second in itertools.pairwise(ordered):
        if kcmp(first, second) == 0:
            return f"fds {first} and {second} became one description"
    for i, fd in enumerate(opened):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != mode(i):
            return f"fd {fd} has another access mode"
    return None


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # above the usual 1024
    opened = [os.open("/dev/null", mode(i)) for i in range(COUNT)]
    dups = {fd: os.dup(fd) for fd in opened[::3]}
    print(f"PID {os.getpid()}\nREADY", flush=True)
    while not os.path.exists(os.path.join(sys.argv[1], "go")):
        time.sleep(0.01)
    why = check(opened, dups)
    print(f"PID {os.getpid()}\n" + (f"FAIL {why}" if why else "PASS"), flush=True)
    return 1 if why else 0


sys.exit(main())
