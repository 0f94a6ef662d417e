"""Regular files, directories and the harmless character devices (/dev/null and friends):
reopened by path with their flags and offset; deleted files from their saved content.  Files on
memory file systems (tmpfs: /dev/shm, an MPI library's session directory there) are saved too,
as another node will not have them, and written back at their path (directories made) at
restore."""

from __future__ import annotations

import os
import stat

from hpccr.engine import memory
from hpccr.engine.fds import memfd, mqueue, procfile
from hpccr.engine.fds.common import NOT_REOPENED
from hpccr.errors import FileMismatch

NAME = "file"
FIELDS = {"content": (str, None)}  # path and ghost are common fields
SAFE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DELETED = " (deleted)"


def recognise(link: str, st: os.stat_result, state) -> bool:
    if (link.startswith("anon_inode:") or memfd.recognise(link, st, state)
            or procfile.recognise(link, st, state) or mqueue.recognise(link, st, state)):
        return False  # eventfd & co., whatever mode the kernel gives their inode; memfds;
        # /proc files of the job (procfile.py); message queues
    return (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            or (stat.S_ISCHR(st.st_mode) and link in SAFE_DEVICES))


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    deleted = link.endswith(DELETED) and st.st_nlink == 0
    path = link[: -len(DELETED)] if deleted else link
    ghost = content = None
    if stat.S_ISREG(st.st_mode):
        if deleted:
            ghost = state.ghosts.save(f"/proc/{pid}/fd/{fd}", st)
        elif state.fs_type(st.st_dev) == memory.TMPFS_MAGIC:
            content = state.ghosts.save(f"/proc/{pid}/fd/{fd}", st)
    return {"path": path, "ghost": ghost, "content": content}


def check(entry: dict, ctx) -> None:
    if entry["ghost"] is None and entry["content"] is None and not os.path.exists(entry["path"]):
        raise FileMismatch(f"fd {entry['fd']}: {entry['path']} no longer exists")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    if entry["content"] is not None:  # with the process's own file rights (Pool.open_all)
        ctx.as_owner(ctx.shared.put_back, entry["content"], entry["path"])
    path = ctx.ghosts.path(entry["ghost"], entry["mode"]) if entry["ghost"] else entry["path"]
    fd = ctx.as_owner(os.open, path, entry["flags"] & ~NOT_REOPENED)
    if not stat.S_ISCHR(entry["mode"]):
        os.lseek(fd, entry["pos"], os.SEEK_SET)
    return fd
