"""inotify: every watch (the watched file, its event mask, its watch descriptor) from fdinfo;
restored by adding the same watches, at the same watch descriptors, to a new instance.

fdinfo names a watched file by a file handle, so a file renamed since it was watched is still
the one found: the dump opens the handle (open_by_handle_at, on the process's mount of that file
system) and records where the file is now.  Watch descriptors are handed out in increasing order
only, so the restore reaches a saved number by adding and removing the watch until the kernel
gives that number.  Events queued and not read yet are not kept: the kernel has no way to read
them without consuming them from the process; the restored queue starts empty.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds.common import cbuf
from hpccr.errors import FileMismatch, ImageCorrupt, RestoreFailed, UnsupportedResource

NAME = "inotify"
LINK = "anon_inode:inotify"
FIELDS = {"watches": [{"wd": int, "mask": int, "path": str}]}
IN_DONT_FOLLOW = 0x02000000  # the saved path is resolved: its last part is the watched inode
IN_NONBLOCK = os.O_NONBLOCK
MAX_WD = 1 << 20  # the restore reaches a number by taking every one below it
FILE_HANDLE = struct.Struct("<Ii")  # struct file_handle: handle_bytes, handle_type
_WATCH = re.compile(r"inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) "
                    r"ignored_mask:[0-9a-f]+ fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
                    r"f_handle:([0-9a-f]*)")
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo's escapes of space, tab, newline, backslash
_KERNEL_MINOR_BITS = 20  # fdinfo shows the kernel's own dev_t


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def _mount_of(pid: int, sdev: int) -> str:
    """A mount point, in `pid`'s view, of the file system `sdev`: its root mount if it has one."""
    wanted = f"{sdev >> _KERNEL_MINOR_BITS}:{sdev & ((1 << _KERNEL_MINOR_BITS) - 1)}"
    found = []
    for line in Path(procfs.path(pid, "mountinfo")).read_text().splitlines():
        fields = line.split()
        if fields[2] == wanted:
            found.append((fields[3] != "/", _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])))
    if not found:
        raise UnsupportedResource(f"process {pid} watches a file (inotify) on a file system it "
                                  "has not mounted: not supported")
    return min(found)[1]


def _watched_path(pid: int, fd: int, match: re.Match) -> str:
    """Where the file that watch `match` of `pid`'s inotify `fd` watches is now."""
    sdev, ino = int(match[3], 16), int(match[2], 16)
    handle = bytes.fromhex(match[7])
    if not handle:
        raise UnsupportedResource(f"process {pid} fd {fd} is an inotify instance watching a file "
                                  "whose file system gives no file handle: not supported")
    mount = os.open(procfs.path(pid, "root") + _mount_of(pid, sdev),
                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # not O_PATH: EBADF
    try:
        _handle, addr = cbuf(FILE_HANDLE.pack(len(handle), int(match[6], 16)) + handle)
        found = native.syscall("open_by_handle_at", mount, addr, os.O_PATH | os.O_CLOEXEC)
    finally:
        os.close(mount)
    try:
        st = os.fstat(found)
        path = os.readlink(f"/proc/self/fd/{found}")
    finally:
        os.close(found)
    if st.st_ino != ino or st.st_nlink == 0:
        raise UnsupportedResource(f"process {pid} fd {fd} is an inotify instance watching a "
                                  f"deleted file ({path}): not supported")
    return path


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    watches = []
    for line in Path(procfs.path(pid, "fdinfo", str(fd))).read_text().splitlines():
        if not line.startswith("inotify "):
            continue
        match = _WATCH.match(line)
        if match is None:
            raise UnsupportedResource(f"process {pid} fd {fd}: an inotify watch this kernel "
                                      f"describes in an unknown way ({line!r})")
        wd = int(match[1], 16)
        if wd > MAX_WD:
            raise UnsupportedResource(f"process {pid} fd {fd}: inotify watch descriptor {wd} is "
                                      f"above {MAX_WD}, which a restore can give back")
        watches.append({"wd": wd, "mask": int(match[4], 16),
                        "path": _watched_path(pid, fd, match)})
    return {"watches": sorted(watches, key=lambda w: w["wd"])}


def check(entry: dict, ctx) -> None:
    numbers = [w["wd"] for w in entry["watches"]]
    for watch in entry["watches"]:
        if not 1 <= watch["wd"] <= MAX_WD or numbers.count(watch["wd"]) > 1 \
                or not 0 < watch["mask"] <= 0xFFFFFFFF:
            raise ImageCorrupt(f"fd {entry['fd']}: inotify watch {watch['wd']} (mask "
                               f"{watch['mask']:#x}) is out of range (image corrupted)")
        if not os.path.lexists(watch["path"]):
            raise FileMismatch(f"fd {entry['fd']}: {watch['path']}, watched (inotify), no "
                               "longer exists")


def _watch(fd: int, path: str, mask: int) -> int:
    _path, addr = cbuf(os.fsencode(path) + b"\0")
    return native.syscall("inotify_add_watch", fd, addr, mask | IN_DONT_FOLLOW)


def _drain(fd: int) -> None:
    """Read away the events of the instance (non-blocking): IN_IGNORED of the numbers taken on
    the way to the saved ones."""
    while True:
        try:
            os.read(fd, 1 << 16)
        except BlockingIOError:
            return


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    """Called with the file rights of the process's owner (Pool.open_all), which a watch needs:
    read permission on the watched file."""
    fd = native.syscall("inotify_init1", IN_NONBLOCK | os.O_CLOEXEC)
    try:
        placed = set()
        for watch in sorted(entry["watches"], key=lambda w: w["wd"]):
            while (got := ctx.as_owner(_watch, fd, watch["path"], watch["mask"])) < watch["wd"]:
                if got in placed:  # the same file as an earlier watch: a link to it
                    raise RestoreFailed(f"fd {entry['fd']}: {watch['path']} is the file of "
                                        f"inotify watch {got} too")
                native.syscall("inotify_rm_watch", fd, got)
            if got != watch["wd"]:
                raise RestoreFailed(f"fd {entry['fd']}: the inotify watch on {watch['path']} "
                                    f"cannot have its number {watch['wd']} again (got {got})")
            placed.add(got)
        _drain(fd)
        os.set_blocking(fd, not entry["flags"] & os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
