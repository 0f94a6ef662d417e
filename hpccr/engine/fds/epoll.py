"""epoll: every watched descriptor with its events and data, from fdinfo.

The kernel keys a watch by (file, descriptor number at registration), and only the number is
visible, so the dump checks with kcmp(KCMP_EPOLL_TFD) that each registered number still holds
the registered file.  One that does not — the number was closed since, or now holds another
file, while the registered file stays open through a duplicate — is looked for among every
descriptor of the dump (kcmp again) and recorded as `file`: the process and descriptor that
hold it now.  Its file only held outside the dump is refused.

Restore: open() creates an empty epoll set; finish() adds the watches once every descriptor of
the process is at its number, since the watch records the number; a watch whose number no
longer holds its file is added with the file put at that number for a moment, and the number
given back what it holds.  A watch whose file is ready is on the ready list again after the
restore, so an edge-triggered event already reported before the dump is reported once more,
and a disabled one-shot watch still reports errors and hangups.
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
# "file": null, or who holds the target's file now (the number holds another file, or none)
FIELDS = {"targets": [{"fd": int, "events": int, "data": U64,
                       "file": ({"pid": int, "fd": int}, None)}]}
EPOLL_CTL_ADD = 1
EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64
KCMP_EPOLL_TFD = 7
KCMP_EPOLL_SLOT = struct.Struct("<III")  # efd, tfd, toff
_TARGET = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)")


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def _holds_target(holder: int, fd: int, pid: int, epfd: int, tfd: int) -> bool:
    """True if descriptor `fd` of `holder` is the file that `pid`'s epoll `epfd` watches as
    `tfd`."""
    _slot, addr = cbuf(KCMP_EPOLL_SLOT.pack(epfd, tfd, 0))
    try:
        return native.syscall("kcmp", holder, pid, KCMP_EPOLL_TFD, fd, addr) == 0
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOENT):
            return False
        raise


def _holder(pid: int, epfd: int, tfd: int, state) -> dict | None:
    """The process (as the image records it) and descriptor of the dump holding the file that
    `pid`'s epoll `epfd` watches as `tfd`, or None."""
    return next(({"pid": state.ids.of(holder), "fd": fd} for holder in sorted(state.pids)
                 for fd in procfs.fds(holder) if _holds_target(holder, fd, pid, epfd, tfd)),
                None)


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    lines = Path(procfs.path(pid, "fdinfo", str(fd))).read_text().splitlines()
    found = [_TARGET.match(line) for line in lines]
    targets = [{"fd": int(m[1]), "events": int(m[2], 16), "data": int(m[3], 16), "file": None}
               for m in found if m]
    for target in targets:
        if _holds_target(pid, target["fd"], pid, fd, target["fd"]):
            continue
        target["file"] = _holder(pid, fd, target["fd"], state)
        if target["file"] is None:
            raise UnsupportedResource(
                f"process {pid} fd {fd} is an epoll set watching a file registered as fd "
                f"{target['fd']}, which the process has closed or replaced since, and that "
                "only processes outside the dump hold: not supported")
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


def finish(entry: dict, ctx, pool) -> None:
    epfd = os.dup(entry["fd"])  # a watch's number may be the set's own for a moment
    try:
        for t in entry["targets"]:
            _event, addr = cbuf(EPOLL_EVENT.pack(t["events"], t["data"]))
            try:
                if t["file"] is None:
                    native.syscall("epoll_ctl", epfd, EPOLL_CTL_ADD, t["fd"], addr)
                else:
                    _watch_moved(epfd, t, addr, pool)
            except OSError as exc:
                raise RestoreFailed(f"fd {entry['fd']}: cannot watch fd {t['fd']} again in the "
                                    f"epoll set: {os.strerror(exc.errno)}") from None
    finally:
        os.close(epfd)


def _watch_moved(epfd: int, target: dict, addr: int, pool) -> None:
    """Watch the file that fd target["file"]["fd"] of process target["file"]["pid"] holds
    under number target["fd"], which holds another file now or none."""
    desc = pool.description(target["file"]["pid"], target["file"]["fd"])
    if desc not in pool.fds:
        raise RestoreFailed(f"the file watched as fd {target['fd']} (fd {target['file']['fd']} "
                            f"of process {target['file']['pid']}) is not in the image")
    number = target["fd"]
    try:
        held_now = os.dup(number)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        held_now = None
    os.dup2(pool.fds[desc], number)
    try:
        native.syscall("epoll_ctl", epfd, EPOLL_CTL_ADD, number, addr)
    finally:
        if held_now is None:
            os.close(number)
        else:
            os.dup2(held_now, number)
            os.close(held_now)
