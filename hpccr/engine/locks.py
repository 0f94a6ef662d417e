"""File locks held through a process's descriptors: flock(2) locks and OFD locks (fcntl
F_OFD_SETLK), which belong to an open file description, and POSIX record locks (fcntl F_SETLK,
lockf), which belong to the process.  HDF5 and NetCDF lock the files they write this way.

Dump: /proc/PID/fdinfo/FD lists the locks taken through that descriptor's open file description
("lock:" lines, as in /proc/locks): every descriptor of a description lists its flock and OFD
locks; a POSIX lock is listed by the descriptor its process took it through (the description
stays open: closing any descriptor of the file would have dropped the lock).  Leases are
refused.

Restore: the locks of a description are taken by the restorer as soon as it has opened the
description again, before the tasks inherit it — but an flock lock whose taker is in the image
("holder": /proc/locks names its pid) is taken by that process itself, so that /proc/locks and
fdinfo name it again.  A process's POSIX locks are taken by the process itself, by an injected
fcntl (flock) at the end of its rebuild: after its memory is mapped,
since the restore opens and closes the files it maps, and closing any descriptor of a file
drops the process's POSIX locks on it.  Nothing waits for a lock: a file someone else has
locked meanwhile (the checkpointed job still running, say) fails the restore, naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from hpccr.engine import procfs
from hpccr.errors import ImageCorrupt, RestoreFailed, UnsupportedResource

# holder: this process took the lock (an flock lock names its taker)
FIELDS = [{"kind": str, "type": str, "start": int, "end": (int, None), "holder": bool}]
KINDS = {"FLOCK": "flock", "OFDLCK": "ofd", "POSIX": "posix"}
TYPES = {"READ": "read", "WRITE": "write"}
F_OFD_SETLK = 37
FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def dump(pid: int, fd: int) -> list[dict]:
    """The locks held through descriptor `fd` of `pid`."""
    locks = []
    for line in procfs.fd_locks(pid, fd):
        # "1: POSIX  ADVISORY  WRITE 4711 fe:00:2146341 5 14" (the last: a number or EOF)
        fields = line.split()
        kind, type_ = KINDS.get(fields[1]), TYPES.get(fields[3])
        if kind is None or type_ is None or fields[2] != "ADVISORY":
            raise UnsupportedResource(f"process {pid} fd {fd} holds a lock of type "
                                      f"'{' '.join(fields[1:4])}': not supported yet")
        locks.append({"kind": kind, "type": type_, "start": int(fields[-2]),
                      "end": None if fields[-1] == "EOF" else int(fields[-1]),
                      "holder": kind == "flock" and fields[4] == str(pid)})
    return locks


def _flock(lock: dict) -> bytes:
    length = 0 if lock["end"] is None else lock["end"] - lock["start"] + 1  # 0: to the end
    kind = fcntl.F_WRLCK if lock["type"] == "write" else fcntl.F_RDLCK
    return FLOCK.pack(kind, 0, lock["start"], length, 0)


def _taken(entry: dict, lock: dict, exc: OSError) -> RestoreFailed:
    held = exc.errno in (errno.EAGAIN, errno.EACCES)
    why = "another process holds a lock on it now" if held else exc.strerror
    return RestoreFailed(f"{entry['path']} (fd {entry['fd']}): cannot take its {lock['type']} "
                         f"{lock['kind']} lock back: {why}")


def take_on_description(fd: int, entry: dict, held_in_process: bool) -> None:
    """In the restorer: the flock and OFD locks of the description `fd`, just opened for
    `entry`; not its flock lock if `held_in_process` (a process of the image takes it)."""
    for lock in entry["locks"]:
        try:
            if lock["kind"] == "flock" and held_in_process:
                continue
            if lock["kind"] == "flock":
                op = fcntl.LOCK_EX if lock["type"] == "write" else fcntl.LOCK_SH
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            elif lock["kind"] == "ofd":
                fcntl.fcntl(fd, F_OFD_SETLK, _flock(lock))
        except OSError as exc:
            raise _taken(entry, lock, exc) from None


def take_posix(inj, entries: list[dict]) -> None:
    """In the rebuilt process, by injected calls: its POSIX locks, and the flock locks it
    took."""
    for entry in entries:
        for lock in entry["locks"]:
            if lock["kind"] == "flock" and lock["holder"]:
                op = fcntl.LOCK_EX if lock["type"] == "write" else fcntl.LOCK_SH
                try:
                    inj.call("flock", entry["fd"], op | fcntl.LOCK_NB)
                except OSError as exc:
                    raise _taken(entry, lock, exc) from None
                continue
            if lock["kind"] != "posix":
                continue
            try:
                inj.call("fcntl", entry["fd"], fcntl.F_SETLK, inj.put(_flock(lock)))
            except OSError as exc:
                raise _taken(entry, lock, exc) from None
            finally:
                inj.reset()


def check(entry: dict) -> None:
    """Images are untrusted: only the kinds, types and ranges a dump writes."""
    for lock in entry["locks"]:
        if (lock["kind"] not in KINDS.values() or lock["type"] not in TYPES.values()
                or lock["start"] < 0 or lock["end"] is not None and lock["end"] < lock["start"]
                or lock["holder"] and lock["kind"] != "flock"):
            raise ImageCorrupt(f"fd {entry['fd']}: a lock of unknown kind, type or range "
                               "(image corrupted)")
