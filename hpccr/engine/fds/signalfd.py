"""signalfd: the set of signals it reports (fdinfo's sigmask); restored with signalfd4.

A signalfd holds no queue of its own: the signals it reads are the reading thread's and the
process's pending signals, which are saved and restored with the threads."""

from __future__ import annotations

import os
import struct

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds.common import cbuf
from hpccr.image.schema import U64

NAME = "signalfd"
LINK = "anon_inode:[signalfd]"
FIELDS = {"sigmask": U64}  # bit n-1 set: signal n is reported


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    return {"sigmask": int(procfs.fdinfo(pid, fd)["sigmask"], 16)}


def check(entry: dict, ctx) -> None:
    """Nothing can be wrong with a valid mask (the kernel ignores SIGKILL and SIGSTOP)."""


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    _mask, addr = cbuf(struct.pack("<Q", entry["sigmask"]))
    return native.syscall("signalfd4", -1, addr, 8, os.O_CLOEXEC | entry["flags"] & os.O_NONBLOCK)
