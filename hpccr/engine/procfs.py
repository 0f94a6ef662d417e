"""Parsers for /proc files, one function per file."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct
from dataclasses import dataclass

PROC = "/proc"
DELETED = " (deleted)"  # how a link of /proc names a file deleted since it was opened

# PAGEMAP_SCAN (linux/fs.h of 6.7+, newer than Debian 12's headers) = _IOWR('f', 16, struct
# pm_scan_arg): struct pm_scan_arg {u64 size, flags, start, end, walk_end, vec, vec_len,
# max_pages, category_inverted, category_mask, category_anyof_mask, return_mask}; its output is
# an array of struct page_region {u64 start, end, categories}.
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_ARG = struct.Struct("<12Q")
PAGE_REGION = struct.Struct("<QQQ")
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 1, 1 << 3, 1 << 4
SCAN_REGIONS = 4096  # page regions per PAGEMAP_SCAN call


def path(pid: int, *parts: str) -> str:
    return os.path.join(PROC, str(pid), *parts)


def pids() -> list[int]:
    """Every process visible here."""
    return [int(entry.name) for entry in os.scandir(PROC) if entry.name.isdigit()]


def tids(pid: int) -> list[int]:
    """Thread ids of process `pid`, the leader first."""
    found = sorted(int(t) for t in os.listdir(path(pid, "task")))
    return [pid] + [t for t in found if t != pid]


@dataclass
class MapsEntry:
    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev: str
    inode: int
    name: str  # path, "[heap]", "" for anonymous

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def deleted(self) -> bool:
        return self.name.endswith(DELETED)


_MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def vm_flags(pid: int) -> dict[int, set[str]]:
    """The VmFlags of each VMA (proc(5) smaps: "mw" may write, "dc" MADV_DONTFORK, "lo"
    mlocked...), by start address."""
    flags, start = {}, None
    with open(path(pid, "smaps")) as f:
        for line in f:
            if line.startswith("VmFlags:"):
                flags[start] = set(line.split()[1:])
            elif (m := _MAPS_RE.match(line.rstrip("\n"))) is not None:
                start = int(m.group(1), 16)
    return flags


def numa_policies(pid: int) -> dict[int, str]:
    """The NUMA memory policy of each VMA as numa_maps writes it ("default", "bind:0-1",
    "interleave=static:0,2"...), by start address."""
    policies = {}
    with open(path(pid, "numa_maps")) as f:
        for line in f:
            fields = line.split(maxsplit=2)
            if len(fields) >= 2:
                policy = fields[1]
                if policy == "prefer" and len(fields) > 2 and fields[2].startswith("(many)"):
                    policy = "prefer(many)" + fields[2].split()[0].removeprefix("(many)")
                policies[int(fields[0], 16)] = policy
    return policies


def maps(pid: int) -> list[MapsEntry]:
    out = []
    with open(path(pid, "maps")) as f:
        for line in f:
            m = _MAPS_RE.match(line.rstrip("\n"))
            if not m:
                continue
            start, end, perms, off, dev, inode, name = m.groups()
            out.append(MapsEntry(int(start, 16), int(end, 16), perms, int(off, 16), dev,
                                 int(inode), name))
    return out


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    p = path(pid, "task", str(tid), "status") if tid else path(pid, "status")
    out = {}
    with open(p) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def stat(pid: int, tid: int | None = None) -> list[str]:
    """Fields of /proc/PID/stat (of thread `tid`'s own with one), 1-based as in proc(5) (index 0
    is unused)."""
    with open(path(pid, "task", str(tid), "stat") if tid else path(pid, "stat")) as f:
        data = f.read()
    head, _, rest = data.rpartition(")")
    pid_field, _, comm = head.partition(" (")
    return ["", pid_field, comm] + rest.split()


def state(pid: int, tid: int | None = None) -> str | None:
    """The state letter of `pid` (of its thread `tid`) as proc(5) gives it, None once gone."""
    try:
        return stat(pid, tid)[3]
    except OSError:
        return None


def leader_exited(pid: int) -> bool:
    """Has the main thread of `pid` exited while other threads run on (pthread_exit in main)?
    The process then shows as a zombie, and its memory, descriptors and cwd only through the
    other threads."""
    return state(pid) == "Z" and running_thread(pid) is not None


def running_thread(pid: int) -> int | None:
    """A thread of `pid` besides its main one that has not ended, or None."""
    try:
        others = tids(pid)[1:]
    except OSError:
        return None
    return next((tid for tid in others if state(pid, tid) not in ("Z", "X", None)), None)


def comm(pid: int, tid: int | None = None) -> str:
    p = path(pid, "task", str(tid), "comm") if tid else path(pid, "comm")
    with open(p) as f:
        return f.read().rstrip("\n")


def cmdline(pid: int) -> list[str]:
    with open(path(pid, "cmdline"), "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]


def auxv(pid: int) -> bytes:
    with open(path(pid, "auxv"), "rb") as f:
        return f.read()


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    out = {}
    with open(path(pid, "fdinfo", str(fd))) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def fd_locks(pid: int, fd: int) -> list[str]:
    """The "lock:" lines of /proc/PID/fdinfo/FD: the locks taken through that descriptor."""
    with open(path(pid, "fdinfo", str(fd))) as f:
        return [line.partition(":")[2].strip() for line in f if line.startswith("lock:")]


def fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(path(pid, "fd")))


def personality(pid: int) -> int:
    with open(path(pid, "personality")) as f:
        return int(f.read(), 16)


def pagemap_fd(pid: int) -> int:
    return os.open(path(pid, "pagemap"), os.O_RDONLY)


def pagemap_scan(fd: int, start: int, end: int, *, flags: int = 0, inverted: int = 0,
                 required: int = 0, anyof: int = 0,
                 returned: int = 0) -> list[tuple[int, int, int]]:
    """The (start, end, categories) regions of [start, end) whose pages have every category
    of `required` and one of `anyof` (those of `inverted` negated first), by PAGEMAP_SCAN on the
    pagemap `fd`; neighbours with the same categories of `returned` are one region.  OSError
    ENOTTY before Linux 6.7."""
    out: list[tuple[int, int, int]] = []
    regions = ctypes.create_string_buffer(PAGE_REGION.size * SCAN_REGIONS)
    while start < end:
        arg = bytearray(PM_SCAN_ARG.pack(PM_SCAN_ARG.size, flags, start, end, 0,
                                         ctypes.addressof(regions), SCAN_REGIONS, 0, inverted,
                                         required, anyof, returned))
        n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
        for first, last, categories in PAGE_REGION.iter_unpack(regions[:n * PAGE_REGION.size]):
            if out and out[-1][1] == first and out[-1][2] == categories:
                out[-1] = (out[-1][0], last, categories)
            else:
                out.append((first, last, categories))
        walk_end = PM_SCAN_ARG.unpack(arg)[4]
        if walk_end <= start:
            raise OSError(errno.EIO, "PAGEMAP_SCAN made no progress")
        start = walk_end
    return out


def ns_pid_depth(pid: int) -> int:
    """How many pid namespaces below ours the process lives in (0: ours)."""
    return len(status(pid).get("NSpid", "").split()) - 1
