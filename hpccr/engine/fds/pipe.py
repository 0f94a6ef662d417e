"""Pipes and FIFOs whose every end is inside the dumped processes: unread data, capacity, and
each end with its access mode and O_NONBLOCK.

The unread data is saved without consuming it, since the job may run on after the dump: a read
end is copied into hpccr (pidfd_getfd) and tee(2) duplicates its content into a fresh pipe, which
hpccr reads.  The first entry of a pipe in the image carries the data and capacity; at restore the
first end opened creates the pipe (a FIFO is opened by its path), sets the capacity and writes the
data back, and every other end, in whichever process, reopens that pipe through /proc/self/fd
with its own mode (see _reopen for whose rights).  With no read end left the data can never be
read and is not saved; ends whose peers have all been closed stay that way (a read end sees the
data and then end-of-file, a write end gets EPIPE).

Refused: a pipe or FIFO that a process outside the dump also holds — the job's stdin, stdout or
stderr connected to its parent or to a logger, the dumper's own pipe.  Saving one side would cut
the connection at restore.  Only processes visible in hpccr's /proc are searched; a pipe end in
flight in a unix socket message is not seen.  Also refused: packet-mode pipes (O_DIRECT) and
deleted FIFOs.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios

from hpccr import native
from hpccr.engine import memory, procfs
from hpccr.engine.fds.common import borrowed, held_files, saved_data
from hpccr.errors import DumpFailed, FileMismatch, ImageCorrupt, UnsupportedResource

NAME = "pipe"
# remake: the permissions of a FIFO on a memory file system (tmpfs), made again at restore
# where it is gone (another node, an MPI session directory removed since).
FIELDS = {"pipe": int, "data": (str, None), "capacity": (int, None), "remake": (int, None)}
ANONYMOUS = "pipe:"
STDIO = {0: " (stdin)", 1: " (stdout)", 2: " (stderr)"}
SPLICE_F_NONBLOCK = 2


def recognise(link: str, st: os.stat_result, state) -> bool:
    return stat.S_ISFIFO(st.st_mode)


class Holders:
    """Who holds each pipe and FIFO: the ends among the dump's processes, and one holder
    outside them, each found in one pass over the descriptors (not one pass per pipe: a job
    with a thousand pipes was frozen for seconds)."""

    def __init__(self, pids):
        self.pids = pids
        self.ends: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for pid, fd, st in held_files(pids):
            if stat.S_ISFIFO(st.st_mode):
                self.ends.setdefault((st.st_dev, st.st_ino), []).append((pid, fd))
        self._outside: dict[str | tuple[int, int], tuple[int, int]] | None = None

    def outside(self, link: str, st: os.stat_result) -> tuple[int, int] | None:
        """(process, descriptor) of a process outside the dump holding this pipe, if any."""
        if self._outside is None:
            self._outside = self._scan_outside()
        key = link if link.startswith(ANONYMOUS) else (st.st_dev, st.st_ino)
        return self._outside.get(key)

    def _scan_outside(self) -> dict[str | tuple[int, int], tuple[int, int]]:
        """Anonymous pipes by their link (pipefs inode numbers are unique), FIFOs by inode."""
        found: dict[str | tuple[int, int], tuple[int, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.pids:
                continue
            try:
                fds = os.listdir(os.path.join(entry.path, "fd"))
            except OSError:
                continue  # gone, or not ours to look at
            for fd in fds:
                path = os.path.join(entry.path, "fd", fd)
                try:
                    link = os.readlink(path)
                    if link.startswith(ANONYMOUS):
                        found.setdefault(link, (int(entry.name), int(fd)))
                    elif link.startswith("/") and stat.S_ISFIFO((st := os.stat(path)).st_mode):
                        found.setdefault((st.st_dev, st.st_ino), (int(entry.name), int(fd)))
                except OSError:
                    continue
        return found


def _refuse_if_shared(pid: int, fd: int, link: str, st: os.stat_result,
                      holders: Holders) -> None:
    holder = holders.outside(link, st)
    if holder is None:
        return
    other, other_fd = holder
    try:
        who = f"process {other} ({procfs.comm(other)})"
    except OSError:
        who = f"process {other}"
    what = "a pipe" if link.startswith(ANONYMOUS) else f"the FIFO {link}"
    raise UnsupportedResource(
        f"process {pid} fd {fd}{STDIO.get(fd, '')} is {what} that another process, {who}, also "
        f"holds (its fd {other_fd}) outside what is dumped: dump the whole job (hpccr run)")


def _unread(copy: int, capacity: int) -> bytes:
    """The content of the pipe behind read end `copy`, left in place (tee)."""
    avail = struct.unpack("i", fcntl.ioctl(copy, termios.FIONREAD, b"\0" * 4))[0]
    if not avail:
        return b""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, capacity)
        copied = native.syscall("tee", copy, w, avail, SPLICE_F_NONBLOCK)
        if copied != avail:
            raise DumpFailed(f"tee copied {copied} of the {avail} bytes in a pipe")
        chunks = []
        while avail:
            chunks.append(os.read(r, avail))
            avail -= len(chunks[-1])
        return b"".join(chunks)
    finally:
        os.close(r)
        os.close(w)


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    flags = int(procfs.fdinfo(pid, fd)["flags"], 8)
    if flags & os.O_DIRECT:
        raise UnsupportedResource(f"process {pid} fd {fd} is a packet-mode pipe (O_DIRECT): "
                                  "not supported yet")
    if link.endswith(procfs.DELETED):
        raise UnsupportedResource(f"process {pid} fd {fd} is a deleted FIFO ({link}): "
                                  "not supported yet")
    entry = {"pipe": st.st_ino, "data": None, "capacity": None, "remake": None}
    if not link.startswith(ANONYMOUS) and state.fs_type(st.st_dev) == memory.TMPFS_MAGIC:
        entry["remake"] = stat.S_IMODE(st.st_mode)
    if st.st_ino in state.pipes:
        return entry  # its first end saved the pipe
    state.pipes.add(st.st_ino)
    if state.pipe_holders is None:
        state.pipe_holders = Holders(state.pids)
    _refuse_if_shared(pid, fd, link, st, state.pipe_holders)
    readers = [(p, n) for p, n in state.pipe_holders.ends.get((st.st_dev, st.st_ino), [])
               if int(procfs.fdinfo(p, n)["flags"], 8) & os.O_ACCMODE != os.O_WRONLY]
    with borrowed(*(readers[0] if readers else (pid, fd))) as copy:
        entry["capacity"] = fcntl.fcntl(copy, fcntl.F_GETPIPE_SZ)
        data = _unread(copy, entry["capacity"]) if readers else b""
    if data:
        entry["data"] = f"pipe-{st.st_ino}.img"
        state.writer.write_bytes(entry["data"], data)
    return entry


def _named(entry: dict) -> bool:
    return not entry["path"].startswith(ANONYMOUS)


def check(entry: dict, ctx) -> None:
    fd = entry["fd"]
    if (entry["capacity"] is None) != (entry["data"] is None) and entry["data"] is not None:
        raise ImageCorrupt(f"fd {fd}: inconsistent pipe entry (image corrupted)")
    if _named(entry) and entry["capacity"] is not None and entry["remake"] is None:
        try:
            is_fifo = stat.S_ISFIFO(os.stat(entry["path"]).st_mode)
        except OSError:
            raise FileMismatch(f"fd {fd}: FIFO {entry['path']} no longer exists") from None
        if not is_fifo:
            raise FileMismatch(f"fd {fd}: {entry['path']} is no longer a FIFO")


def _reopen(local: int, flags: int, ctx) -> int:
    """A new open file description of the pipe behind `local`, with an end's mode and flags.
    A read-write helper is open meanwhile: with a reader and a writer present, opening an end
    neither blocks nor fails (ENXIO), whatever ends the pipe has.

    As the owner, or as root for a trusted image (Context.as_owner), like the FIFO's path: a
    pipe or FIFO opened by root before the process dropped its privileges (a FIFO of mode 0600,
    a pipe made for a root process of the tree) is not the owner's to open again."""
    helper = ctx.as_owner(os.open, f"/proc/self/fd/{local}", os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = ctx.as_owner(os.open, f"/proc/self/fd/{helper}",
                          flags & os.O_ACCMODE | os.O_CLOEXEC)
    finally:
        os.close(helper)
    os.set_blocking(fd, not flags & os.O_NONBLOCK)
    return fd


def _make_fifo(path: str, mode: int) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.mkfifo(path, 0o600)
    os.chmod(path, mode)


def _fill(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    """Runs in the restorer: the first end of a pipe creates it (from the entry that carries its
    data), later ends, of any process, reopen it."""
    ino = entry["pipe"]
    if ino in pool.pipes:
        return _reopen(pool.pipes[ino], entry["flags"], ctx)
    saved = pool.entry_with(lambda e: e["kind"] == NAME and e["pipe"] == ino
                            and e["capacity"] is not None)
    if saved is None:
        raise ImageCorrupt(f"fd {entry['fd']}: no entry carries its pipe (image corrupted)")
    if _named(saved):
        if saved["remake"] is not None and not os.path.lexists(saved["path"]):
            ctx.as_owner(_make_fifo, saved["path"], saved["remake"])
        r = w = ctx.as_owner(os.open, saved["path"], os.O_RDWR | os.O_CLOEXEC)  # never blocks
    else:
        r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, saved["capacity"])
        if saved["data"]:
            data = saved_data(ctx, saved["data"])
            if len(data) > saved["capacity"]:
                raise ImageCorrupt(f"pipe {ino}: more data than the pipe holds "
                                   "(image corrupted)")
            _fill(w, data)
        pool.pipes[ino] = (fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 0) if r == w
                           else os.open(f"/proc/self/fd/{r}", os.O_RDWR | os.O_CLOEXEC))
        return _reopen(r, entry["flags"], ctx)
    finally:
        os.close(r)
        if w != r:
            os.close(w)
