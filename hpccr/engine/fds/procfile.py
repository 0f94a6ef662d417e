"""Files and directories under /proc/PID of a process of the job: /proc/self/stat,
/proc/<child>/fd, /proc/<pid>/maps...

Their path names a pid (/proc/self is resolved when it is opened), and a restore gives every
process and thread its pid back, so the same path names the same process again.  The path is
kept as the process saw it, in the /proc of its own pid namespace (the job's with `hpccr run`),
with the pid as the image records it.

Dump: that pid must be one of the dumped processes or one of their threads; a /proc file of
any other process is refused, and so is one of a thread of another process (that thread does
not exist yet when the file is opened again: not supported yet).
Restore: opened late, by the restored process itself (an injected openat, in its own mount
namespace, whose /proc is its pid namespace's), once its threads exist and while it still has
root's credentials (another process may still be a stub, whose /proc files only root may open);
the pids are checked against the image's before anything is created, so an image cannot open
another process's files.
The offset is set again.  Each process opens its own open file description: one shared with
another process comes back as two.
"""

from __future__ import annotations

import os
import re

from hpccr.engine.fds.common import NOT_REOPENED
from hpccr.errors import ImageCorrupt, RestoreFailed, UnsupportedResource

NAME = "procfile"
FIELDS = {"proc_pid": int}
LATE = True  # opened by the restored process itself: see open_late()
PATH = re.compile(r"/proc/(\d+)(?:/task/(\d+))?(?:/.*)?")
AT_FDCWD = -100
LINKS = ("cwd", "root", "exe")  # links out of /proc/PID
LINK_DIRS = ("fd", "map_files", "ns")  # directories of such links


def recognise(link: str, st: os.stat_result, state) -> bool:
    return PATH.fullmatch(link) is not None and st.st_dev in state.procfs_devices()


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    match = PATH.fullmatch(link)
    named = [int(n) for n in match.groups() if n is not None]
    ids = state.job_ids()  # id as recorded -> the recorded pid of its process
    own = state.ids.of(pid)
    for n in named:
        if n not in ids:
            raise UnsupportedResource(
                f"process {pid} fd {fd} is {link}, a /proc file of process {n}, which is not "
                "dumped with it: not supported")
        if ids[n] != n and ids[n] != own:
            raise UnsupportedResource(
                f"process {pid} fd {fd} is {link}, a /proc file of a thread of another "
                "process: not supported yet")
    return {"proc_pid": named[0]}


def check(entry: dict, ctx) -> None:
    """The path is opened as root: it must name a file of /proc/PID itself, never one reached
    through a link (cwd, root, exe, fd/N, map_files/RANGE, ns/NAME lead out of it) or `..`, which a
    path the kernel showed at the dump never holds."""
    path = entry["path"]
    match = PATH.fullmatch(path)
    parts = path.split("/")[3:]
    if (match is None or int(match[1]) != entry["proc_pid"]
            or any(part in ("", ".", "..", *LINKS) for part in parts)
            or any(part in LINK_DIRS for part in parts[:-1])):
        raise ImageCorrupt(f"fd {entry['fd']}: {path} is not a /proc file of process "
                           f"{entry['proc_pid']} (image corrupted)")


def check_pids(proc: dict, image_ids: set[int]) -> None:
    """Before anything is created, after check(): every pid the /proc paths of `proc` name is
    one of `image_ids` (every pid and tid of the image), so an image cannot open another
    process's files."""
    for entry in proc["fds"]:
        if entry["kind"] != NAME:
            continue
        named = {int(n) for n in PATH.fullmatch(entry["path"]).groups() if n is not None}
        if not named <= image_ids:
            raise ImageCorrupt(f"process {proc['pid']} fd {entry['fd']}: {entry['path']} names "
                               "a process that is not in the image (image corrupted)")


def open_late(inj, proc: dict) -> None:
    """Open the /proc files of `proc` inside it (by `inj`) at their numbers and offsets."""
    opened: dict[int, int] = {}  # desc -> the number it was opened at
    for entry in proc["fds"]:
        if entry["kind"] != NAME:
            continue
        path, number = entry["path"], entry["fd"]
        if entry["desc"] in opened:
            inj.call("dup3", opened[entry["desc"]], number, 0)
            continue
        try:  # close-on-exec is set with the other descriptors' (fds.set_cloexec)
            new = inj.call("openat", AT_FDCWD, inj.put(path.encode() + b"\0"),
                           entry["flags"] & ~NOT_REOPENED, 0)
            if new != number:
                inj.call("dup3", new, number, 0)
                inj.call("close", new)
            if entry["pos"]:
                inj.call("lseek", number, entry["pos"], os.SEEK_SET)
        except OSError as exc:
            raise RestoreFailed(f"process {proc['pid']} fd {number}: cannot open {path} "
                                f"again: {os.strerror(exc.errno)}") from None
        finally:
            inj.reset()
        opened[entry["desc"]] = number
