"""Pseudo-terminals whose master is held inside the dump (Open MPI's mpirun gives each rank one
for its output; `script`, `expect` and terminal multiplexers do the same): both ends, their
terminal settings and window size, and the output the master has not read yet.

At restore a new pair is made (`/dev/ptmx`, so the slave's number, `/dev/pts/N`, may differ)
with the saved settings; each master descriptor gets its master, each slave descriptor the
slave (TIOCGPTPEER).  The output waiting for the master is read out at the dump — read, since
a terminal cannot be peeked — and written straight back through the slave with output
processing (OPOST) off for a moment, so that the job finds it unchanged; at restore it is put
into the new pair the same way.

A slave whose master is not in the dump is a terminal of the outside world (the user's, say):
like the `tty` kind it is reconnected to the terminal `hpccr restore` runs on.  Refused: input
the slave has not read yet, and packet mode.  Not kept: the pair as the controlling terminal
of a session.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios

from hpccr.engine.fds import tty
from hpccr.engine.fds.common import borrowed, held_files, saved_data
from hpccr.errors import ImageCorrupt, UnsupportedResource

NAME = "pty"
FIELDS = {"role": str, "index": int, "termios": ([int], None), "cc": ([int], None),
          "winsize": ([int], None), "data": (str, None)}
PTMX = (5, 2)
SLAVE_MAJORS = range(136, 144)  # UNIX98_PTY_SLAVE_MAJOR and the next 7
TIOCGPTN, TIOCGPTPEER, TIOCGPKT = 0x80045430, 0x5441, 0x80045438
WINSIZE = struct.Struct("4H")
UINT = struct.Struct("I")


def recognise(link: str, st: os.stat_result, state) -> bool:
    if not stat.S_ISCHR(st.st_mode):
        return False
    device = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return device == PTMX or device[0] in SLAVE_MAJORS


def _ioctl_uint(fd: int, request: int) -> int:
    return UINT.unpack(fcntl.ioctl(fd, request, bytes(UINT.size)))[0]


def _masters(pids) -> set[int]:
    """The numbers of the pseudo-terminals whose master a process of the dump holds."""
    found = set()
    for pid, fd, st in held_files(pids):
        if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == PTMX:
            with borrowed(pid, fd) as copy:
                found.add(_ioctl_uint(copy, TIOCGPTN))
    return found


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    if state.ptys is None:
        state.ptys = _masters(state.pids)
    entry = {"role": "slave", "index": os.minor(st.st_rdev) + 256 * (os.major(st.st_rdev) - 136),
             "termios": None, "cc": None, "winsize": None, "data": None}
    master = (os.major(st.st_rdev), os.minor(st.st_rdev)) == PTMX
    with borrowed(pid, fd) as copy:
        if master:
            entry.update(role="master", index=_ioctl_uint(copy, TIOCGPTN))
            if _ioctl_uint(copy, TIOCGPKT):
                raise UnsupportedResource(f"process {pid} fd {fd} is a pseudo-terminal master "
                                          "in packet mode: not supported yet")
            attrs = termios.tcgetattr(copy)  # the slave's, through its master
            entry["termios"] = attrs[:6]
            entry["cc"] = [c[0] if isinstance(c, bytes) else c for c in attrs[6]]
            entry["winsize"] = list(WINSIZE.unpack(fcntl.ioctl(copy, termios.TIOCGWINSZ,
                                                               bytes(WINSIZE.size))))
            pending = _take_output(copy)
            if pending:
                entry["data"] = f"pty-{entry['index']}.img"
                state.writer.write_bytes(entry["data"], pending)
        elif entry["index"] not in state.ptys:
            return {**entry, "role": "terminal"}
        elif _ioctl_uint(copy, termios.FIONREAD):
            raise UnsupportedResource(f"process {pid} fd {fd} is a pseudo-terminal with input "
                                      "not read yet: not supported yet")
    return entry


def _take_output(master: int) -> bytes:
    """What the slave wrote and the master has not read: read, then put back as it was."""
    size = _ioctl_uint(master, termios.FIONREAD)
    if not size:
        return b""
    flags = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    data = bytearray()
    try:
        while len(data) < size:
            try:
                chunk = os.read(master, size - len(data))
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        fcntl.fcntl(master, fcntl.F_SETFL, flags)
    _put_output(master, bytes(data))
    return bytes(data)


def _put_output(master: int, data: bytes) -> None:
    """Queue `data` for the master to read, unchanged: written by the slave with OPOST off."""
    if not data:
        return
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        attrs = termios.tcgetattr(slave)
        raw = list(attrs)
        raw[1] &= ~termios.OPOST
        termios.tcsetattr(slave, termios.TCSANOW, raw)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(slave, view):]
        finally:
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
    finally:
        os.close(slave)


def check(entry: dict, ctx) -> None:
    if entry["role"] == "terminal":
        tty.check(entry, ctx)
    elif entry["role"] not in ("master", "slave"):
        raise ImageCorrupt(f"fd {entry['fd']}: unknown pseudo-terminal role (image corrupted)")
    elif entry["role"] == "master" and (entry["termios"] is None or len(entry["termios"]) != 6
                                        or entry["cc"] is None or entry["winsize"] is None
                                        or len(entry["winsize"]) != 4):
        raise ImageCorrupt(f"fd {entry['fd']}: pseudo-terminal master without its settings "
                           "(image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    """Runs in the restorer: the first end of a pair makes it (from its master's entry)."""
    if entry["role"] == "terminal":
        return tty.open(entry, ctx, pool)
    index = entry["index"]
    if index not in pool.ptys:
        pool.ptys[index] = _make_pair(pool, index, ctx)
    master = pool.ptys[index]
    flags = entry["flags"] & (os.O_NONBLOCK | os.O_APPEND)
    if entry["role"] == "master":
        fd = os.dup(master)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return fd
    return fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | flags)


def _make_pair(pool, index: int, ctx) -> int:
    """A new pseudo-terminal with the settings and pending output of the saved pair `index`;
    returns its master."""
    saved = pool.entry_with(lambda e: e["kind"] == NAME and e["role"] == "master"
                            and e["index"] == index)
    if saved is None:
        raise ImageCorrupt(f"pseudo-terminal {index}: no entry of its master (image corrupted)")
    master, slave = os.openpty()
    try:
        termios.tcsetattr(master, termios.TCSANOW, [*saved["termios"], saved["cc"]])
        fcntl.ioctl(master, termios.TIOCSWINSZ, WINSIZE.pack(*saved["winsize"]))
        if saved["data"]:
            _put_output(master, saved_data(ctx, saved["data"]))
        return fcntl.fcntl(master, fcntl.F_DUPFD_CLOEXEC, 0)
    finally:
        os.close(master)
        os.close(slave)
