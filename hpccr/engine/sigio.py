"""Signal-driven I/O (O_ASYNC): whom an open file description signals when I/O is possible
(F_SETOWN_EX: a thread, a process or a process group) and with which signal (F_SETSIG).

Only the process itself can see either: the dump asks with injected fcntl calls, for its
descriptors with O_ASYNC set, and the restore sets both again the same way in the rebuilt
process, then turns O_ASYNC on.  It does so after the process has its own credentials back:
the kernel records the caller's credentials with the owner and checks them at each signal, so
an owner set while the task is still root could be signalled whoever it is.  The owner must
exist by then: a thread of a process rebuilt later fails the restore, naming it.
"""

from __future__ import annotations

import fcntl
import os
import struct

from hpccr import native
from hpccr.errors import RestoreFailed

F_SETSIG, F_GETSIG = 10, 11
F_SETOWN_EX, F_GETOWN_EX = 15, 16
OWNER = struct.Struct("ii")  # struct f_owner_ex: type (F_OWNER_TID 0, PID 1, PGRP 2), pid


def dump(inj, pid: int, entries: list[dict]) -> None:
    """Add `sigio` to every fd entry of `pid`: None, or the owner and signal of O_ASYNC."""
    for entry in entries:
        entry["sigio"] = None
        if not entry["flags"] & os.O_ASYNC:
            continue
        try:
            at = inj.put(bytes(OWNER.size))
            inj.call("fcntl", entry["fd"], F_GETOWN_EX, at)
            owner_type, owner = OWNER.unpack(native.read_mem(pid, at, OWNER.size))
            entry["sigio"] = {"owner_type": owner_type, "owner": owner,
                              "signal": inj.call("fcntl", entry["fd"], F_GETSIG)}
        finally:
            inj.reset()


def restore(inj, entries: list[dict]) -> None:
    """In the rebuilt process, with its own credentials: owner, signal, then O_ASYNC."""
    for entry in entries:
        sigio = entry["sigio"]
        if sigio is None:
            continue
        fd = entry["fd"]
        try:
            owner = inj.put(OWNER.pack(sigio["owner_type"], sigio["owner"]))
            inj.call("fcntl", fd, F_SETOWN_EX, owner)
            inj.call("fcntl", fd, F_SETSIG, sigio["signal"])
            flags = inj.call("fcntl", fd, fcntl.F_GETFL) & ~os.O_ASYNC
            inj.call("fcntl", fd, fcntl.F_SETFL, flags)  # O_ASYNC given to open() did nothing
            inj.call("fcntl", fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        except OSError as exc:
            raise RestoreFailed(f"fd {fd}: cannot make its signal-driven I/O to "
                                f"{sigio['owner']} again: {exc.strerror}") from None
        finally:
            inj.reset()
