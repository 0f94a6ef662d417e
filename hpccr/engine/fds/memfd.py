"""memfd (memfd_create): a named memory file with its content, size and seals.

Dump: the content goes into the image as a ghost file (engine/ghosts.py), once per memfd; its
shared mappings name that same ghost file.  The seals are read with F_GET_SEALS.

Restore: the restorer makes each memfd once (pool.memfds, by ghost file) with the file-system
rights of the process that holds it, so that the memfd (a tmpfs inode owned by its creator)
belongs to that process's user.  It gets its name, mode and content, then its seals, before
anything maps it (F_SEAL_WRITE needs no writable shared mapping), except F_SEAL_FUTURE_WRITE on
a memfd mapped shared and writable: that seal forbids making such a mapping, so it comes once
every process has its mappings.  Each open file description is
the memfd reopened through /proc/self/fd with its own flags and offset.  The shared mappings of
the memfd then map the memfd itself, not a copy: SharedObjects gives them a path to the
descriptor of the first restored process that holds it, /proc/PID/fd/N with the pid as the tree
sees it (so also in a job's pid namespace), so that writes through the descriptors and through
the mappings meet.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat

from hpccr.engine import ghosts, procfs
from hpccr.engine.fds.common import NOT_REOPENED, borrowed, saved_data, saved_file
from hpccr.errors import ImageCorrupt

NAME = "memfd"
FIELDS = {"path": str, "ghost": str, "seals": int}  # path and ghost never null here
PREFIX = "/memfd:"
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20  # Linux 5.1 and 6.3; not in Python 3.11's fcntl
SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
         | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC)
MFD_EXEC = 0x10  # Linux 6.3: no exec seal, whatever vm.memfd_noexec says


@functools.cache
def _memfd_device() -> int:
    """The device of every memfd (the kernel's internal tmpfs; hugetlbfs memfds differ)."""
    fd = os.memfd_create("hpccr-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def recognise(link: str, st: os.stat_result, state) -> bool:
    return (stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and link.startswith(PREFIX)
            and link.endswith(procfs.DELETED) and st.st_dev == _memfd_device())


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    with borrowed(pid, fd) as copy:
        seals = fcntl.fcntl(copy, fcntl.F_GET_SEALS)
    return {"path": link[:-len(procfs.DELETED)], "seals": seals,
            "ghost": state.ghosts.save(procfs.path(pid, "fd", str(fd)), st)}


def check(entry: dict, ctx) -> None:
    if not entry["path"].startswith(PREFIX) or entry["seals"] & ~SEALS:
        raise ImageCorrupt(f"fd {entry['fd']}: memfd '{entry['path']}' with seals "
                           f"{entry['seals']:#x} (image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    memfd = pool.memfds.get(entry["ghost"])
    if memfd is None:
        memfd = pool.memfds[entry["ghost"]] = _create(entry, ctx, pool)
        ctx.shared.hold(entry["ghost"], f"/proc/{ctx.proc['pid']}/fd/{entry['fd']}")
    flags = entry["flags"] & ~NOT_REOPENED | os.O_CLOEXEC
    fd = ctx.as_owner(os.open, f"/proc/self/fd/{memfd}", flags)
    os.lseek(fd, entry["pos"], os.SEEK_SET)
    return fd


def _create(entry: dict, ctx, pool) -> int:
    """The memfd with its name, mode, content, then its seals, which forbid changing those.

    Made sealable unless its only seal is F_SEAL_SEAL: the seals of a memfd made without
    MFD_ALLOW_SEALING.  F_SEAL_FUTURE_WRITE (and F_SEAL_SEAL after it) waits until every
    process has mapped the memfd if one maps it shared and writable: that seal forbids making
    such a mapping, not having one (pool.late_seals)."""
    seals = entry["seals"]
    late = 0
    if seals & F_SEAL_FUTURE_WRITE and _mapped_writable(entry["ghost"], pool):
        late = seals & (F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
    flags = os.MFD_CLOEXEC | (0 if seals == fcntl.F_SEAL_SEAL else os.MFD_ALLOW_SEALING)
    name = entry["path"][len(PREFIX):]
    try:
        fd = os.memfd_create(name, flags | MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.memfd_create(name, flags)  # before Linux 6.3, which adds no exec seal
    try:
        os.fchmod(fd, stat.S_IMODE(entry["mode"]))
        src = saved_file(ctx, entry["ghost"])
        try:
            ghosts.fill(fd, src, saved_data(ctx, entry["ghost"] + ghosts.EXTENTS))
        finally:
            os.close(src)
        if flags & os.MFD_ALLOW_SEALING and seals & ~late:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals & ~late)
        if late:
            pool.late_seals.append((os.dup(fd), late))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mapped_writable(ghost: str, pool) -> bool:
    """Does a process of the image map this memfd shared and writable?"""
    return any(v["kind"] == "shmem" and v["shared"] and v["prot"][1] == "w"
               and (v["file"] or {}).get("ghost") == ghost
               for ctx, _ in pool.tables for v in ctx.proc["vmas"])
