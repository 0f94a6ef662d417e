"""epoll: every watched descriptor with its events and data, from fdinfo.

The kernel keys a watch by (file, descriptor number at registration), and only the number is
visible, so the dump checks with kcmp(KCMP_EPOLL_TFD) that each registered number still holds
the registered file.  A file that was registered and then closed (kept open only through a
duplicate) or whose number now holds another file is refused: the restored watch could not be
told apart from a fresh one when the process later modifies or deletes it.

Restore: open() creates an empty epoll set; finish() adds the watches once every descriptor of
the process is at its number, since the watch records the number.  A watch whose file is ready
is on the ready list again after the restore, so an edge-triggered event already reported before
the dump is reported once more, and a disabled one-shot watch still reports errors and hangups.
"""

from __future__ import annotations

import errno
import os
import re
import select
import struct
from pathlib import Path

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds.common import cbuf
from hpccr.errors import ImageCorrupt, RestoreFailed, UnsupportedResource
from hpccr.image.schema import U64

NAME = "epoll"
LINK = "anon_inode:[eventpoll]"
FIELDS = {"targets": [{"fd": int, "events": int, "data": U64}]}
EPOLL_CTL_ADD = 1
EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64
KCMP_EPOLL_TFD = 7
KCMP_EPOLL_SLOT = struct.Struct("<III")  # efd, tfd, toff
_TARGET = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)")


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def _still_registered(pid: int, epfd: int, tfd: int) -> bool:
    """True if descriptor `tfd` of `pid` is the file registered as `tfd` in epoll `epfd`."""
    _slot, addr = cbuf(KCMP_EPOLL_SLOT.pack(epfd, tfd, 0))
    try:
        return native.syscall("kcmp", pid, pid, KCMP_EPOLL_TFD, tfd, addr) == 0
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOENT):
            return False
        raise


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    lines = Path(procfs.path(pid, "fdinfo", str(fd))).read_text().splitlines()
    found = [_TARGET.match(line) for line in lines]
    targets = [{"fd": int(m[1]), "events": int(m[2], 16), "data": int(m[3], 16)}
               for m in found if m]
    numbers = [t["fd"] for t in targets]
    for n in numbers:
        if numbers.count(n) > 1 or not _still_registered(pid, fd, n):
            raise UnsupportedResource(
                f"process {pid} fd {fd} is an epoll set watching a file registered as fd {n}, "
                "which the process has closed or replaced since (the file stays watched "
                "through a duplicate): not supported yet")
    return {"targets": targets}


def check(entry: dict, ctx) -> None:
    """Event masks are 32-bit; whether each target exists is only known in the new task, where
    finish() says it clearly."""
    for t in entry["targets"]:
        if not 0 <= t["events"] <= 0xFFFFFFFF:
            raise ImageCorrupt(f"fd {entry['fd']}: epoll events {t['events']:#x} for fd "
                               f"{t['fd']} are out of range (image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    with select.epoll() as ep:
        fd = os.dup(ep.fileno())
    os.set_blocking(fd, not entry["flags"] & os.O_NONBLOCK)
    return fd


def finish(entry: dict, ctx) -> None:
    for t in entry["targets"]:
        _event, addr = cbuf(EPOLL_EVENT.pack(t["events"], t["data"]))
        try:
            native.syscall("epoll_ctl", entry["fd"], EPOLL_CTL_ADD, t["fd"], addr)
        except OSError as exc:
            raise RestoreFailed(f"fd {entry['fd']}: cannot watch fd {t['fd']} again in the "
                                f"epoll set: {os.strerror(exc.errno)}") from None
