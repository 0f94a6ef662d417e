"""Address space: VMAs and their pages.

Dump: every VMA of /proc/PID/maps is recorded; the pages worth saving are the present or swapped
pages of private mappings that are anonymous (pagemap bit 61 clear: heap, stack, and the
copy-on-write pages inside private file mappings); shared memory is saved apart, with its object
(ghosts.py, sysv.py).  They are found with PAGEMAP_SCAN (the pagemap's entries where a page is
not present), copied with process_vm_readv in large batches (/proc/PID/mem for unreadable VMAs)
and streamed into the image.

Restore (inside the stub, by injected calls): unmap the stub, move [vvar]/[vvar_vclock]/[vdso] to
their saved addresses, map every VMA (writable while its pages are written), put the pages from
the image's pages file into it (UFFDIO_COPY into private anonymous VMAs, placement.py;
process_vm_writev into the others), then set the final protections.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from hpccr import faults, native
from hpccr.engine import procfs
from hpccr.errors import (
    AccessDenied,
    ImageCorrupt,
    IncompatibleMachine,
    RestoreFailed,
    UnsupportedResource,
    starting_threads,
)
from hpccr.image.pages import page_buffers
from hpccr.image.schema import check_part
from hpccr.spans import intersect, overlaps

PAGE = native.PAGE_SIZE
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61
PAGEMAP_CHUNK = 1 << 20  # entries read per pread (8 MiB)
# bytes per process_vm_readv / write batch: two buffers used in turn, small enough that faulting
# them in (slow fresh memory in a VM) costs little next to the copy, and hpccr stays small
COPY_BATCH = 8 << 20
WRITES_IN_FLIGHT = 3  # batches a restore holds while it reads (or decompresses) the next
POPULATE_MIN = 1 << 20  # runs of saved pages from this long are faulted in by the target

SPECIAL = {"[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar_vclock",
           "[vsyscall]": "vsyscall"}
RELOCATED = ("vvar", "vvar_vclock", "vdso")

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE = 0x100, 0x4000
MADV_POPULATE_WRITE = 23  # Linux 5.14
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000


ANONYMOUS_KINDS = ("anon", "heap", "stack")  # private mappings of no file: no page cache


def kind_of(entry: procfs.MapsEntry) -> str:
    if entry.name in SPECIAL:
        return SPECIAL[entry.name]
    if entry.name == "[heap]":
        return "heap"
    if entry.name.startswith("[stack"):
        return "stack"
    if entry.inode == 0 and (entry.name == "" or entry.name.startswith("[anon")):
        return "anon"
    if entry.shared and entry.name.startswith("/SYSV"):
        return "sysvshm"  # a SysV segment attached with shmat: its inode number is its id
    if entry.shared and entry.deleted:
        # MAP_SHARED|MAP_ANONYMOUS (a deleted /dev/zero), memfds, unlinked shm files
        return "shmem"
    if entry.name.startswith("/"):
        return "ghost" if entry.deleted else "file"
    raise UnsupportedResource(f"memory mapping {entry.start:#x}-{entry.end:#x} "
                              f"'{entry.name}' is not supported")


def prot_bits(perms: str) -> int:
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def saves_pages(vma: dict) -> bool:
    """Shared mappings keep their data in their file or object, saved apart if at all."""
    return vma["kind"] not in (*RELOCATED, "vsyscall") and not vma["shared"]


# --- dump ----------------------------------------------------------------------------------


def select_pages(pid: int, vmas: list[dict]) -> list[tuple[int, int]]:
    """(address, length) of every page range to save, in address order.  Neighbour ranges are
    merged, unless only one of them can be read with process_vm_readv (MemoryReader)."""
    ranges: list[tuple[int, int]] = []
    last_readable = True  # whether ranges[-1] can be read with process_vm_readv
    fd = procfs.pagemap_fd(pid)
    try:
        for vma in vmas:
            if not saves_pages(vma):
                continue
            readable = vma["prot"][0] == "r"
            count = 0
            for start, end in _saved_runs(fd, vma["start"], vma["end"],
                                          vma["kind"] in ANONYMOUS_KINDS):
                if (ranges and ranges[-1][0] + ranges[-1][1] == start
                        and readable == last_readable):
                    ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
                else:
                    ranges.append((start, end - start))
                count += (end - start) // PAGE
                last_readable = readable
            vma["saved_pages"] = count
    finally:
        os.close(fd)
    return ranges


def _saved_runs(fd: int, start: int, end: int, anonymous: bool):
    """The (start, end) runs of pages worth saving of the private mapping at [start, end):
    present or swapped, anonymous (not a file's page cache), no pte markers.  In a mapping of
    no file, PAGEMAP_SCAN finds the present ones (a few regions for the whole of a large
    mapping: 2 GiB in 6-8 ms, 25 reading its pagemap); the pagemap's entries tell the others,
    and those of a file's mapping (its page cache pages, a device's pages), apart."""
    if not anonymous:
        yield from _pagemap_runs(fd, start, end)
        return
    try:
        regions = procfs.pagemap_scan(fd, start, end,
                                      anyof=procfs.PAGE_IS_PRESENT | procfs.PAGE_IS_SWAPPED,
                                      returned=procfs.PAGE_IS_PRESENT)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
        regions = [(start, end, 0)]  # before Linux 6.7
    for first, last, categories in regions:
        if categories & procfs.PAGE_IS_PRESENT:
            yield first, last
        else:  # swapped, or a pte marker (which PAGEMAP_SCAN counts as swapped)
            yield from _pagemap_runs(fd, first, last)


def _pagemap_runs(fd: int, start: int, end: int):
    """The runs of present or swapped anonymous pages in [start, end), from the pagemap."""
    first, total = start // PAGE, (end - start) // PAGE
    for chunk in range(0, total, PAGEMAP_CHUNK):
        entries = os.pread(fd, min(PAGEMAP_CHUNK, total - chunk) * 8, (first + chunk) * 8)
        for at, pages in native.pagemap_runs(entries, PM_PRESENT | PM_SWAPPED, PM_FILE):
            yield (first + chunk + at) * PAGE, (first + chunk + at + pages) * PAGE


def shared_with_parent(pid: int, parent: int, ranges: list[tuple[int, int]],
                       parent_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (start, end) spans of `ranges` (the pages `pid` saves) where its `parent` maps the
    very same page at the same address, and saves it too (`parent_ranges`): the pages they
    still share since fork (copy-on-write), equal by construction.  Both must be frozen.  The
    page frames in pagemap need CAP_SYS_ADMIN; without them nothing is found shared."""
    candidates = intersect([(a, a + n) for a, n in ranges],
                           [(a, a + n) for a, n in parent_ranges])
    if not candidates:
        return []
    shared: list[tuple[int, int]] = []
    fd, parent_fd = procfs.pagemap_fd(pid), procfs.pagemap_fd(parent)
    try:
        for start, end in candidates:
            for at in range(start, end, PAGEMAP_CHUNK * PAGE):
                n = min(PAGEMAP_CHUNK, (end - at) // PAGE)
                mine = os.pread(fd, n * 8, at // PAGE * 8)
                theirs = os.pread(parent_fd, n * 8, at // PAGE * 8)
                for first, count in native.pagemap_same(mine, theirs):
                    begin = at + first * PAGE
                    if shared and shared[-1][1] == begin:
                        shared[-1] = (shared[-1][0], begin + count * PAGE)
                    else:
                        shared.append((begin, begin + count * PAGE))
    finally:
        os.close(fd)
        os.close(parent_fd)
    return shared


def split_batches(ranges: list[tuple[int, int]], limit: int = COPY_BATCH):
    """Split ranges into batches of at most `limit` bytes (long ranges are cut)."""
    batch, size = [], 0
    for addr, length in ranges:
        while length:
            take = min(length, limit - size)
            batch.append((addr, take))
            size += take
            addr += take
            length -= take
            if size == limit:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def read_runs(pid: int, batch: list[tuple[int, int]], view: memoryview, read_apart) -> None:
    """Read the runs of `batch` into `view`, one after the other: `read_apart(addr, part)` reads
    a run itself and says so, the others are read with one process_vm_readv per row of them.
    Without `read_apart`, the whole batch is one row (no Python step per run)."""
    groups: list[list] = []  # [view offset, size, addrs, lens] of runs in a row
    if read_apart is None:
        if batch:
            addrs, lens = zip(*batch, strict=True)
            groups.append([0, sum(lens), addrs, lens])
    else:
        offset = 0
        for addr, length in batch:
            if read_apart(addr, view[offset:offset + length]):
                pass
            elif groups and groups[-1][0] + groups[-1][1] == offset:
                groups[-1][1] += length
                groups[-1][2].append(addr)
                groups[-1][3].append(length)
            else:
                groups.append([offset, length, [addr], [length]])
            offset += length
    for at, size, addrs, lens in groups:
        try:
            native.read_ranges(pid, native.ffi.new("unsigned long long[]", addrs),
                               native.ffi.new("unsigned long long[]", lens), len(addrs),
                               view[at:at + size])
        except OSError as exc:
            raise OSError(exc.errno, f"process_vm_readv of {len(addrs)} ranges in "
                                     f"{addrs[0]:#x}-{addrs[-1] + lens[-1]:#x}: "
                                     f"{os.strerror(exc.errno)}") from None


class MemoryReader:
    """Reads page runs of a process: process_vm_readv of as many runs at once as it can, and
    /proc/PID/mem for the runs of unreadable VMAs (PROT_NONE, write-only), which
    process_vm_readv refuses.  A run never spans VMAs of both kinds (select_pages())."""

    def __init__(self, pid: int, unreadable: list[tuple[int, int]]):
        self.pid = pid
        self.unreadable = sorted(unreadable)
        self._mem = -1

    def read(self, batch: list[tuple[int, int]], view: memoryview) -> None:
        apart = batch and overlaps(self.unreadable, batch[0][0], batch[-1][0] + batch[-1][1])
        read_runs(self.pid, batch, view, self._read_unreadable if apart else None)

    def _read_unreadable(self, addr: int, part: memoryview) -> bool:
        if not overlaps(self.unreadable, addr, addr + 1):
            return False
        if self._mem < 0:
            self._mem = os.open(procfs.path(self.pid, "mem"), os.O_RDONLY)
        _read_exact(self._mem, part, addr)
        return True

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1


def copy_pages(batches, reader, pages, kept: list | None = None) -> None:
    """Stream `batches` of page runs, read by `reader` (see MemoryReader), into `pages` (an image
    PageWriter).

    Two buffers in turn: while one batch is written out (and hashed) by a helper thread, the next
    one is read from the target; both steps run without the GIL. The buffers (as large as the
    largest batch) are allocated here, after a snapshot dump has released the target: fresh
    memory is slow.  `kept`: buffers of COPY_BATCH kept from one copy to the next (a series of
    periodic checkpoints: in a VM, the fresh memory of new ones costs as much as the copy of a
    small increment), filled in on first use."""
    if not batches:
        return
    if kept is not None:
        if not kept:
            kept.extend(page_buffers(2, COPY_BATCH, "copy"))
        buffers = kept
    else:
        largest = max(sum(n for _, n in batch) for batch in batches)
        buffers = page_buffers(min(2, len(batches)), largest, "copy")
    try:
        with starting_threads("hpccr's writer thread"), ThreadPoolExecutor(1) as writer:
            in_flight: list = []
            for i, batch in enumerate(batches):
                if len(in_flight) == len(buffers):
                    in_flight.pop(0).result()
                faults.point("copy")
                view = memoryview(buffers[i % len(buffers)])[:sum(n for _, n in batch)]
                try:
                    reader.read(batch, view)
                except BaseException:
                    view.release()
                    raise
                in_flight.append(writer.submit(_write_batch, pages, batch, view))
            for future in in_flight:
                future.result()
    finally:
        if buffers is not kept:
            close_buffers(buffers)


def close_buffers(buffers: list) -> None:
    for buf in buffers:
        # After a failed write, the traceback may still hold a view of a buffer: the garbage
        # collector unmaps that one instead.
        with contextlib.suppress(BufferError):
            buf.close()


def _write_batch(pages, batch: list[tuple[int, int]], view: memoryview) -> None:
    with view:
        pages.write_runs(batch, view)


def _read_exact(fd: int, view: memoryview, addr: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], addr + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short read of memory at {addr + done:#x}")
        done += n


def describe_vmas(pid: int, entries: list[procfs.MapsEntry], ghosts) -> list[dict]:
    """The image records of the VMAs.  Saved apart, once per file however many processes map
    it: deleted mapped files, shared memory objects, and files in memory-backed file systems
    (POSIX shared memory in /dev/shm: another node's will not have them)."""
    vmas = []
    # Each file walks every page table of the process (2 GiB: ~20 ms each): side by side.
    with starting_threads("hpccr's /proc reader thread"), ThreadPoolExecutor(1) as helper:
        numa = helper.submit(procfs.numa_policies, pid)
        flags = procfs.vm_flags(pid)
        policies = numa.result()
    for e in entries:
        kind = kind_of(e)
        vm = flags.get(e.start, set())
        policy = policies.get(e.start, "default")
        vma = {"start": e.start, "end": e.end, "prot": e.perms, "shared": e.shared,
               "kind": kind, "path": None, "offset": e.offset, "file": None, "saved_pages": 0,
               "advice": sorted(vm & ADVICE.keys()), "may_write": "mw" in vm,
               "policy": None if policy == "default" else policy}
        if kind == "sysvshm":
            _describe_sysv(pid, e, vma)
        elif kind in ("file", "ghost", "shmem"):
            name = e.name[: -len(procfs.DELETED)] if e.deleted else e.name
            link = procfs.path(pid, "map_files", f"{e.start:x}-{e.end:x}")
            st = os.stat(link)
            keep = kind != "file" or (e.shared and in_memory(link))
            vma["path"] = name
            vma["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "ghost": ghosts.save(link, st) if keep else None}
        vmas.append(vma)
    return vmas


def _describe_sysv(pid: int, e: procfs.MapsEntry, vma: dict) -> None:
    """A SysV segment is saved with its IPC namespace (sysv.py): the VMA only names it."""
    size = os.stat(procfs.path(pid, "map_files", f"{e.start:x}-{e.end:x}")).st_size
    if e.offset or e.end - e.start != -(-size // PAGE) * PAGE:
        raise UnsupportedResource(f"process {pid} maps part of SysV shared memory segment "
                                  f"{e.inode} at {e.start:#x} (partly unmapped or protected "
                                  "apart): not supported yet")
    vma["path"] = e.name[: -len(procfs.DELETED)] if e.deleted else e.name
    vma["shmid"] = e.inode


TMPFS_MAGIC = 0x01021994
# VmFlags (smaps) that madvise set, and the advice that sets each again; "lo"/"lf": mlock(2)ed
# (on fault), set again with mlock2.
ADVICE = {"dc": 10, "wf": 18, "dd": 16, "hg": 14, "nh": 15, "mg": 12, "lo": 0, "lf": 0}
ADVICE_NAMES = {"dc": "MADV_DONTFORK", "wf": "MADV_WIPEONFORK", "dd": "MADV_DONTDUMP",
                "hg": "MADV_HUGEPAGE", "nh": "MADV_NOHUGEPAGE", "mg": "MADV_MERGEABLE",
                "lo": "mlock", "lf": "mlock (MLOCK_ONFAULT)"}
LOCKED = {"lo", "lf"}
THP_ADVICE = {"hg", "nh"}  # MADV_HUGEPAGE, MADV_NOHUGEPAGE
HINTS = {"hg", "nh", "mg"}  # no THP or KSM where restored: a warning, the memory is the same
MLOCK_ONFAULT = 1
# NUMA policies as numa_maps names them, and the mode mbind takes (with its flags).
NUMA_MODES = {"prefer": 1, "bind": 2, "interleave": 3, "local": 4, "prefer(many)": 5,
              "weighted interleave": 6}
NUMA_FLAGS = {"": 0, "static": 1 << 15, "relative": 1 << 14}
NODEMASK_BYTES = 128  # 1024 nodes


def in_memory(path: str) -> bool:
    """Is `path` on tmpfs (a file another node will not have)?"""
    return native.statfs_type(path) == TMPFS_MAGIC


# --- restore -------------------------------------------------------------------------------


def find_free(occupied: list[tuple[int, int]], size: int, low: int = 0x10000000,
              high: int = 0x7FF000000000) -> int:
    """Lowest page-aligned address >= low where `size` bytes overlap nothing in `occupied`."""
    addr = low
    for start, end in sorted(occupied):
        if end <= addr:
            continue
        if start >= addr + size:
            break
        addr = (end + PAGE - 1) & ~(PAGE - 1)
    if addr + size > high:
        raise RestoreFailed("no free address range for the restore scratch area")
    return addr


def clear_stub(inj, pid: int) -> list[procfs.MapsEntry]:
    """Unmap all of the stub's own mappings; returns the special ones left in place."""
    specials = []
    for e in procfs.maps(pid):
        if e.start == inj.base or e.name in SPECIAL:
            if e.name in SPECIAL and SPECIAL[e.name] != "vsyscall":
                specials.append(e)
            continue
        inj.call("munmap", e.start, e.end - e.start)
    return specials


def move_specials(inj, current: list[procfs.MapsEntry], saved: list[dict],
                  occupied: list[tuple[int, int]]) -> None:
    """Move [vvar]/[vvar_vclock]/[vdso] to their saved addresses, keeping their layout."""
    want = {v["kind"]: v for v in saved if v["kind"] in RELOCATED}
    have = {SPECIAL[e.name]: e for e in current}
    for kind, e in have.items():
        if kind not in want:
            inj.call("munmap", e.start, e.end - e.start)
    for kind, v in want.items():
        e = have.get(kind)
        if e is None or e.end - e.start != v["end"] - v["start"]:
            raise IncompatibleMachine(
                f"the kernel's {kind} mapping differs from the image's (different kernel?)")
    if not want:
        return
    # Through a temporary spot, since the saved and current places may overlap.
    lo = min(e.start for e in have.values() if SPECIAL[e.name] in want)
    span = max(e.end for e in have.values()) - lo
    temp = find_free(occupied + [(e.start, e.end) for e in have.values()], span)
    for kind in want:
        e = have[kind]
        inj.call("mremap", e.start, e.end - e.start, e.end - e.start,
                 MREMAP_MAYMOVE | MREMAP_FIXED, temp + e.start - lo)
    for kind, v in want.items():
        e = have[kind]
        inj.call("mremap", temp + e.start - lo, e.end - e.start, e.end - e.start,
                 MREMAP_MAYMOVE | MREMAP_FIXED, v["start"])


def map_vmas(inj, vmas: list[dict], open_file) -> None:
    """mmap every saved VMA at its place; those with saved pages stay writable for now.

    `open_file(vma)` returns a descriptor, valid in the target, for a file-backed VMA."""
    for v in vmas:
        if v["kind"] in (*RELOCATED, "vsyscall"):
            continue
        length = v["end"] - v["start"]
        prot = prot_bits(v["prot"])
        if v["saved_pages"]:
            prot |= PROT_READ | PROT_WRITE
        flags = MAP_FIXED | (MAP_SHARED if v["shared"] else MAP_PRIVATE)
        if v["kind"] == "sysvshm":
            _attach_sysv(inj, v)
            continue
        fd, offset = -1, 0
        if v["kind"] in ("file", "ghost", "shmem"):
            fd, offset = open_file(v), v["offset"]
        else:
            flags |= MAP_ANONYMOUS | MAP_NORESERVE
            if v["kind"] == "stack":
                flags |= MAP_GROWSDOWN
        try:
            inj.call("mmap", v["start"], length, prot, flags, fd, offset)
        except OSError as exc:
            raise OSError(exc.errno, f"mapping {v['start']:#x}-{v['end']:#x} ({v['kind']}): "
                                     f"{exc.strerror}") from None
        for flag in THP_ADVICE.intersection(v["advice"]):
            # Before the pages are written, so that they get (or do not get) huge pages as the
            # process's own did; advise_vmas() gives it again, and says if it is refused.
            with contextlib.suppress(OSError):
                inj.call("madvise", v["start"], length, ADVICE[flag])


def _attach_sysv(inj, vma: dict) -> None:
    """shmat the VMA's segment (made again by sysv.py) at its place, with its protection."""
    check_part(vma, {"shmid": int}, "vma")
    prot = prot_bits(vma["prot"])
    flags = (0 if prot & PROT_WRITE else SHM_RDONLY) | (SHM_EXEC if prot & PROT_EXEC else 0)
    try:
        inj.call("shmat", vma["shmid"], vma["start"], flags)
    except OSError as exc:
        raise RestoreFailed(f"cannot attach SysV shared memory segment {vma['shmid']} at "
                            f"{vma['start']:#x}: {os.strerror(exc.errno)}") from None
    if not prot & PROT_READ:
        inj.call("mprotect", vma["start"], vma["end"] - vma["start"], prot)


def write_pages(pid: int, sources, populate=None, placer=None) -> None:
    """Copy the saved pages into the target: from each (PageReader, spans) of `sources` (an
    image and the parents it leaves pages to, image/chain.py), the pages inside those spans
    (None: all), read out of the page cache or decompressed, in batches written by two threads
    while the next is read.  Those in the VMAs registered with `placer` (placement.py), if
    given, are placed by UFFDIO_COPY.

    `populate(addr, length)`, if given, faults a range of the others in, in the target: hpccr's
    threads write a batch while the target's own thread gets the fresh memory of the next one
    (page faults, zeroing: in a VM they cost more than the copy)."""
    try:
        for reader, spans in sources:
            _write_from(pid, reader, spans, populate, placer)
    finally:
        for reader, _ in sources:
            reader.close()


def _write_from(pid: int, reader, spans, populate, placer) -> None:
    if spans == []:
        return  # a parent that holds none of the pages still wanted
    limit = reader.batch_limit
    runs = sorted(reader.runs)  # address order, as `spans`
    pieces = [(vaddr, vaddr + nr * PAGE) for vaddr, nr, _ in runs]
    if spans is not None:
        pieces = intersect(pieces, spans)
    if placer is not None:
        pieces = placer.split(pieces)
    # The file's runs in a row: runs[j] is stored right after runs[j - 1] when their numbers
    # here are the same (as a dump writes them: then a batch may skip pages not wanted).
    in_row = [0] * len(runs)
    for j in range(1, len(runs)):
        prev = runs[j - 1]
        in_row[j] = in_row[j - 1] + (prev[2] + prev[1] * PAGE != runs[j][2])
    batches = []  # _Batch: pieces within `limit` bytes of the pages file, in its order
    i = 0
    for start, end in pieces:
        while runs[i][0] + runs[i][1] * PAGE <= start:  # the run holding this piece
            i += 1
        vaddr, _, offset = runs[i]
        for piece in range(start, end, limit):  # cut into pieces of at most `limit`
            length = min(limit, end - piece)
            at = offset + piece - vaddr
            last = batches[-1] if batches else None
            if (last and in_row[last.run] == in_row[i] and at >= last.at + last.span
                    and at + length - last.at <= limit):
                last.add(piece, length, at, i)
            else:
                batches.append(_Batch(piece, length, at, i))
    batches.sort(key=lambda b: b.at)  # in the file's order: a compressed one is read through
    # from the second batch on: the first is written at once
    ahead = _Populator(populate, placer.registered if placer else [])
    uffd = placer.uffd if placer else None
    chunks = reader.chunks([(b.at, b.span) for b in batches], WRITES_IN_FLIGHT)
    try:
        with starting_threads("hpccr's writer threads"), ThreadPoolExecutor(2) as pool:
            pending: deque = deque()
            for number, (chunk, batch) in enumerate(zip(chunks, batches, strict=True)):
                pending.append(pool.submit(_write_batch_to, pid, chunk, batch, uffd))
                if number + 1 < len(batches):
                    ahead.fault_in(batches[number + 1])
                if len(pending) == WRITES_IN_FLIGHT:
                    pending.popleft().result()
            for done in pending:
                done.result()
    finally:
        chunks.close()  # its view of the file's mapping, before close() unmaps it


class _Populator:
    """Faults in the long runs of a batch through `populate`, but those inside the `placed`
    spans; a hint only (the writes fault in whatever it leaves), given up at its first error
    (such as a kernel before 5.14)."""

    def __init__(self, populate, placed: list[tuple[int, int]]):
        self._populate = populate
        self._placed = placed

    def fault_in(self, batch: _Batch) -> None:
        if self._populate is None:
            return
        for addr, length in zip(batch.addrs, batch.lens, strict=True):
            if length >= POPULATE_MIN and not overlaps(self._placed, addr, addr + length):
                try:
                    self._populate(addr, length)
                except OSError:
                    self._populate = None
                    return


class _Batch:
    """Page runs written with one process_vm_writev: from `span` bytes of the pages file at
    `at`, each run's bytes at its offset there (pages between them, not wanted, skipped)."""

    def __init__(self, addr: int, length: int, at: int, run: int):
        self.at, self.span, self.run = at, length, run
        self.addrs, self.lens, self.offsets = [addr], [length], [0]
        self.gaps = False

    def add(self, addr: int, length: int, at: int, run: int) -> None:
        self.gaps |= at != self.at + self.span
        self.addrs.append(addr)
        self.lens.append(length)
        self.offsets.append(at - self.at)
        self.span = at + length - self.at
        self.run = run


def _write_batch_to(pid: int, chunk: memoryview, batch: _Batch, uffd: int | None) -> None:
    new = native.ffi.new
    a = new("unsigned long long[]", batch.addrs)
    n = new("unsigned long long[]", batch.lens)
    at = new("unsigned long long[]", batch.offsets) if batch.gaps else native.ffi.NULL
    try:
        if uffd is None:
            native.write_ranges(pid, a, n, len(batch.addrs), chunk, at)
        else:
            native.place_ranges(uffd, pid, a, n, len(batch.addrs), chunk, at)
    finally:
        chunk.release()  # a view of the file's mapping (which close() unmaps) or of a buffer


def advise_vmas(inj, vmas: list[dict], memlock_limit: int | None) -> None:
    """The madvise state, mlock and NUMA policy of every VMA, once its pages are in.
    `memlock_limit`: the bytes the process may lock (None: any, for an image only root could
    have written); more is refused."""
    locked = sum(v["end"] - v["start"] for v in vmas if LOCKED & set(v["advice"]))
    if memlock_limit is not None and locked > memlock_limit:
        raise AccessDenied(f"the image locks {locked} bytes of memory, more than its "
                           f"RLIMIT_MEMLOCK ({memlock_limit})")
    for v in vmas:
        if v["kind"] in (*RELOCATED, "vsyscall"):
            continue
        length = v["end"] - v["start"]
        for flag in v["advice"]:
            if flag not in ADVICE:
                raise ImageCorrupt(f"VMA advice {flag!r} unknown (image corrupted)")
            if flag == "lo" and "lf" in v["advice"]:
                continue  # locked on fault: one mlock2(MLOCK_ONFAULT)
            try:
                if flag in LOCKED:
                    inj.call("mlock2", v["start"], length, MLOCK_ONFAULT if flag == "lf" else 0)
                else:
                    inj.call("madvise", v["start"], length, ADVICE[flag])
            except OSError as exc:
                if flag in HINTS and exc.errno == errno.EINVAL:
                    print(f"hpccr: warning: {v['start']:#x}-{v['end']:#x}: {ADVICE_NAMES[flag]} "
                          "is not available here (a hint: the memory is the same)",
                          file=sys.stderr)
                    continue
                raise OSError(exc.errno, f"{v['start']:#x}-{v['end']:#x}: "
                                         f"{ADVICE_NAMES[flag]}: {exc.strerror}") from None
        if v["policy"] is not None:
            mode, nodes = numa_policy(v["policy"])
            mask = inj.put(nodes.to_bytes(NODEMASK_BYTES, "little"))
            try:
                inj.call("mbind", v["start"], length, mode, mask, NODEMASK_BYTES * 8, 0)
            except OSError as exc:
                raise OSError(exc.errno, f"{v['start']:#x}-{v['end']:#x}: NUMA policy "
                                         f"{v['policy']}: {exc.strerror}") from None
            inj.reset()


def numa_policy(text: str) -> tuple[int, int]:
    """(mode with its flags, node bitmask) of a policy as numa_maps writes it."""
    name, _, nodes = text.partition(":")
    name, _, flag = name.partition("=")
    if name not in NUMA_MODES or flag not in NUMA_FLAGS:
        raise ImageCorrupt(f"NUMA policy {text!r} unknown (image corrupted)")
    mask = 0
    for part in filter(None, nodes.split(",")):
        first, _, last = part.partition("-")
        if not first.isdigit() or last and not last.isdigit():
            raise ImageCorrupt(f"NUMA policy {text!r}: bad nodes (image corrupted)")
        for node in range(int(first), int(last or first) + 1):
            if node >= NODEMASK_BYTES * 8:
                raise ImageCorrupt(f"NUMA policy {text!r}: node {node} (image corrupted)")
            mask |= 1 << node
    return NUMA_MODES[name] | NUMA_FLAGS[flag], mask


def protect_vmas(inj, vmas: list[dict]) -> None:
    for v in vmas:
        if v["saved_pages"] and v["kind"] not in RELOCATED:
            prot = prot_bits(v["prot"])
            if prot != PROT_READ | PROT_WRITE:
                inj.call("mprotect", v["start"], v["end"] - v["start"], prot)
