"""eventfd: the 64-bit counter and the semaphore mode, read from fdinfo (the dump does not touch
the counter); restored by creating an eventfd and writing the counter into it."""

from __future__ import annotations

import os

from hpccr.engine import procfs
from hpccr.errors import ImageCorrupt, UnsupportedResource
from hpccr.image.schema import U64

NAME = "eventfd"
LINK = "anon_inode:[eventfd]"
FIELDS = {"count": U64, "semaphore": bool}
MAX_COUNT = (1 << 64) - 2  # the kernel's limit for the counter


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    info = procfs.fdinfo(pid, fd)
    if "eventfd-semaphore" not in info:
        raise UnsupportedResource(f"process {pid} fd {fd} is an eventfd, and this kernel's fdinfo "
                                  "does not tell whether it is a semaphore (newer kernels do)")
    return {"count": int(info["eventfd-count"], 16), "semaphore": info["eventfd-semaphore"] == "1"}


def check(entry: dict, ctx) -> None:
    if entry["count"] > MAX_COUNT:
        raise ImageCorrupt(f"fd {entry['fd']}: eventfd counter {entry['count']} is out of range "
                           "(image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    flags = (os.EFD_SEMAPHORE if entry["semaphore"] else 0) | os.EFD_CLOEXEC
    fd = os.eventfd(0, flags)
    if entry["count"]:
        os.eventfd_write(fd, entry["count"])
    os.set_blocking(fd, not entry["flags"] & os.O_NONBLOCK)
    return fd
