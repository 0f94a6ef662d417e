"""Regular files, directories and the harmless character devices (/dev/null and friends):
reopened by path with their flags and offset; deleted files from their saved content, a deleted
directory as an empty directory deleted in turn.  Files on
memory file systems (tmpfs: /dev/shm, an MPI library's session directory there) are saved too,
as another node will not have them, and written back at their path (directories made) at
restore.  A descriptor of shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, opened through
/proc/PID/map_files: "/dev/zero (deleted)") reopens the object the restorer makes for that
memory (SharedObjects), which the mappings map too: descriptor and mappings stay one object, on
a memory file system as before."""

from __future__ import annotations

import os
import stat

from hpccr.engine import memory, procfs
from hpccr.engine.fds import memfd, mqueue, procfile
from hpccr.engine.fds.common import NOT_REOPENED
from hpccr.errors import FileMismatch, UnsupportedResource

NAME = "file"
FIELDS = {"content": (str, None)}  # path and ghost are common fields
SAFE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
SHARED_ANON = "/dev/zero"  # the name of shared anonymous memory, deleted
UNNAMED = os.O_TMPFILE & ~os.O_DIRECTORY  # the flag of a file made by O_TMPFILE


def recognise(link: str, st: os.stat_result, state) -> bool:
    if (link.startswith("anon_inode:") or memfd.recognise(link, st, state)
            or procfile.recognise(link, st, state) or mqueue.recognise(link, st, state)):
        return False  # eventfd & co., whatever mode the kernel gives their inode; memfds;
        # /proc files of the job (procfile.py); message queues
    return (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            or (stat.S_ISCHR(st.st_mode) and link in SAFE_DEVICES))


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    deleted = link.endswith(procfs.DELETED) and st.st_nlink == 0
    if link.endswith(procfs.DELETED) and not deleted and not _named(link, st):
        raise UnsupportedResource(
            f"process {pid} fd {fd} is {link}: a file removed under the name it was opened by "
            "that lives on under another (a hard link), which hpccr cannot find: not "
            "supported yet")
    # A deleted directory keeps its mark: it comes back as an empty deleted one (open()).
    path = link[: -len(procfs.DELETED)] if deleted and not stat.S_ISDIR(st.st_mode) else link
    ghost = content = None
    if stat.S_ISREG(st.st_mode):
        if deleted:
            ghost = state.ghosts.save(f"/proc/{pid}/fd/{fd}", st)
        elif state.fs_type(st.st_dev) == memory.TMPFS_MAGIC:
            content = state.ghosts.save(f"/proc/{pid}/fd/{fd}", st)
    return {"path": path, "ghost": ghost, "content": content}


def _named(path: str, st: os.stat_result) -> bool:
    """Whether `path` (one that ends as a deleted one's does) names the file `st` itself."""
    try:
        here = os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)


def check(entry: dict, ctx) -> None:
    if (entry["ghost"] is None and entry["content"] is None and not _deleted_directory(entry)
            and not os.path.exists(entry["path"])):
        raise FileMismatch(f"fd {entry['fd']}: {entry['path']} no longer exists")


def _deleted_directory(entry: dict) -> bool:
    return stat.S_ISDIR(entry["mode"]) and entry["path"].endswith(procfs.DELETED)


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    if entry["content"] is not None:  # with the process's own file rights (Pool.open_all)
        ctx.as_owner(ctx.shared.put_back, entry["content"], entry["path"])
    flags = entry["flags"] & ~NOT_REOPENED
    if entry["ghost"] and entry["path"] == SHARED_ANON and stat.S_ISREG(entry["mode"]):
        fd = ctx.as_restorer(os.open, ctx.shared.shmem(entry["ghost"]), flags)
        os.lseek(fd, entry["pos"], os.SEEK_SET)
        return fd
    if entry["ghost"] and entry["flags"] & UNNAMED:  # made by O_TMPFILE, never named
        flags &= ~os.O_TMPFILE
        try:  # made so again, it may still be given a name
            fd = ctx.ghosts.unnamed(entry["ghost"], os.path.dirname(entry["path"]), flags,
                                    entry["mode"])
        except OSError:
            pass  # its directory cannot have one: a plain deleted file, below
        else:
            os.lseek(fd, entry["pos"], os.SEEK_SET)
            return fd
    if entry["ghost"]:
        path = ctx.ghosts.path(entry["ghost"], entry["mode"])
    elif _deleted_directory(entry):
        path = ctx.ghosts.directory()  # empty, and deleted before the process runs
    else:
        path = entry["path"]
    fd = ctx.as_owner(os.open, path, flags)
    if not stat.S_ISCHR(entry["mode"]) and not flags & os.O_PATH:  # O_PATH: no offset
        os.lseek(fd, entry["pos"], os.SEEK_SET)
    return fd
