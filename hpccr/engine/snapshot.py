"""Copy-on-write snapshot of a process's memory with userfaultfd write protection (DESIGN §3b).

Inside the freeze, open() gets a userfaultfd of the target's mm that only the dumper holds, and
protect() registers the private anonymous VMAs that have pages to save in (synchronous)
write-protect mode, write-protects them, and copies at once the few pages write protection
cannot cover: copy-on-write pages of private file mappings, shared anonymous memory, unreadable
VMAs. The target is then thawed; memory.copy_pages() reads the pages in address order through
read() while the target runs, and a handler thread serves its write faults.

Why the image holds every page as it was at the freeze:
- On a write fault on page P, the handler first reads into a side buffer P and the rest of its
  64 KiB block, as far as the copier still needs them, and only then un-protects the block,
  which lets the write proceed. Nothing writes a write-protected page without such a fault, so
  the saved copies are the pages as they were at the freeze.
- The copier reads a batch of pages, then, under the lock the handler saves under, takes the
  pages saved for that batch and marks the batch done; the handler saves nothing in a done
  batch. It puts the saved copies over what it read, and only then un-protects the batch.
- Take P in a batch. If P was un-protected before the copier's read of P ended, P was saved
  before that un-protect, hence before the copier took the saved pages: the image gets the
  saved copy. Otherwise P stayed write-protected during the whole read, which therefore saw P
  at the freeze (a saved copy, if any, holds the same bytes). A read torn by a concurrent
  un-protect falls in the first case; un-protects after the batch is done come too late to
  matter. No interleaving of writer, handler and copier escapes these two cases.
- Mapping changes do not fault. MADV_DONTNEED/MADV_FREE send REMOVE and drop the pages only
  once we have read the event (recorded under the same lock), so REMOVE matters only for a
  batch not yet done. munmap and mremap change the pages before their UNMAP/REMAP event, so
  either matters for any protected page, done or not. Such an event makes the snapshot lost
  (SnapshotLost): the dump starts over with the classic copy inside a freeze. finish()
  unregisters, then waits until the kernel has no such event in flight, so none is missed.

For an incremental checkpoint's tracking (tracking.py), `tracked` snapshots keep every page
protected after its copy: every write since the freeze then faults, and the handler notes the
block it lets go, as it notes every mapping change; release() hands the list over, with the
process frozen again, to the tracker that takes over the memory.

Failure safety: the userfaultfd exists only in the dumper (the target's descriptor is closed
inside the freeze; no UFFD_FEATURE_EVENT_FORK, so a child forked meanwhile gets no part of it).
Closing it, which the kernel also does when the dumper dies, removes the registration and the
write protection and wakes every thread waiting on it.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import select
import struct
import threading
import time

from hpccr import native
from hpccr.engine import memory, procfs
from hpccr.errors import starting_threads
from hpccr.spans import overlaps, union

PAGE = native.PAGE_SIZE

# linux/userfaultfd.h, as in 6.18 (same values in Debian 12's older header). The ioctls are
# _IOWR/_IOR(0xAA, nr, struct): uffdio_api and uffdio_writeprotect are 24 bytes, uffdio_register
# 32, uffdio_range 16.
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
# Not WP_UNPOPULATED: a page absent at the freeze is absent from the image too, so a write to it
# changes nothing saved. Not WP_HUGETLBFS_SHMEM: shared memory can be written through other
# processes' page tables, so it is copied inside the freeze.
FEATURES = (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE
            | UFFD_FEATURE_EVENT_UNMAP)
# struct uffd_msg (32 bytes): u8 event, 7 reserved bytes, a union of up to three u64:
# pagefault {flags, address, ptid}, remap {from, to, len}, remove/unmap {start, end}.
UFFD_MSG = struct.Struct("<B7xQQQ")
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

REGISTERED_KINDS = memory.ANONYMOUS_KINDS  # userfaultfd takes private anonymous memory
BLOCK = 64 << 10  # what one write fault saves and un-protects
SETTLE_TIMEOUT_S = 10.0


class SnapshotLost(Exception):
    """The snapshot no longer holds (the target unmapped or moved protected memory, exited or
    exec'd); the dump must start over."""


def uffd_ioctl(fd: int, request: int, *fields: int) -> tuple[int, ...]:
    arg = bytearray(struct.pack(f"<{len(fields)}Q", *fields))
    fcntl.ioctl(fd, request, arg)
    return struct.unpack(f"<{len(fields)}Q", arg)


def _split(ranges: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """(inside, outside): the parts of `ranges` inside and outside the sorted `spans`, as
    (start, end) pairs in address order."""
    inside, outside = [], []
    for addr, length in ranges:
        end = addr + length
        i = max(bisect.bisect_right(spans, (addr, float("inf"))) - 1, 0)
        while addr < end:
            while i < len(spans) and spans[i][1] <= addr:
                i += 1
            if i == len(spans) or spans[i][0] >= end:
                outside.append((addr, end))
                break
            start, stop = spans[i]
            if addr < start:
                outside.append((addr, start))
                addr = start
            inside.append((addr, min(stop, end)))
            addr = min(stop, end)
    return inside, outside


def pinned(pid: int) -> bool:
    """Whether the process has pages pinned for a device, which writes them behind the page
    tables (RDMA, io_uring): write protection cannot see those writes."""
    return procfs.status(pid).get("VmPin", "0 kB").split()[0] != "0"


def take_userfaultfd(pid: int, inj, features: int) -> int | None:
    """A userfaultfd of the frozen process `pid`'s mm (its injector `inj`) with `features`,
    held by the dumper alone; None where the process or the kernel does not allow one."""
    if pinned(pid):
        return None
    if procfs.status(pid).get("Seccomp", "0") != "0":
        return None  # a filter may kill the process for calling userfaultfd()
    try:
        # Without UFFD_USER_MODE_ONLY: with it, a kernel write into a protected page (a
        # read() into a buffer) would fail with EFAULT instead of waiting. So an
        # unprivileged target (vm.unprivileged_userfaultfd=0) gets EPERM and none.
        uffd = inj.take_fd("userfaultfd", O_CLOEXEC | O_NONBLOCK)
    except OSError:
        return None
    try:
        uffd_ioctl(uffd, UFFDIO_API, UFFD_API, features, 0)
    except OSError:
        os.close(uffd)
        return None
    return uffd


class Snapshot:
    """A userfaultfd of the target's mm and the copy-on-write state of one dump."""

    def __init__(self, pid: int, uffd: int, tracked: bool):
        self.pid = pid
        self.uffd = uffd
        self.tracked = tracked
        self._touched: list[tuple[int, int]] = []  # tracked: written or changed since the freeze
        self.batches: list[list[tuple[int, int]]] = []
        self._registered: list[tuple[int, int]] = []  # merged spans, address order
        self._live: list[tuple[int, int]] = []  # pages to save inside them
        self._early: list[tuple[int, int, int]] = []  # (start, end, offset in _early_buf)
        self._early_buf: mmap.mmap | None = None
        self._ends: list[int] = []  # end address of each batch
        self._lock = threading.Lock()
        self._saved: dict[int, list] = {}  # batch index -> [(address, saved copy)]
        self._handled: set[int] = set()  # blocks (by start) saved and un-protected
        self._done = 0  # the batches below this address are copied
        self._lost: str | None = None
        self._stop = -1
        self._thread: threading.Thread | None = None
        self._unregistered = False

    # --- inside the freeze ---------------------------------------------------------------

    @classmethod
    def open(cls, pid: int, inj, tracked: bool = False) -> Snapshot | None:
        """A userfaultfd of the frozen target's mm held by the dumper alone, or None where a
        snapshot cannot be taken (the classic copy is used then). `tracked`: see above."""
        uffd = take_userfaultfd(pid, inj, FEATURES)
        return None if uffd is None else cls(pid, uffd, tracked)

    @property
    def registered(self) -> list[tuple[int, int]]:
        return list(self._registered)

    def protect(self, vmas: list[dict], ranges: list[tuple[int, int]],
                unreadable: list[tuple[int, int]]) -> bool:
        """Write-protect the private anonymous pages among `ranges` and copy the others now.
        False if nothing could be protected (the snapshot is then of no use)."""
        for vma in vmas:
            if (vma["saved_pages"] and not vma["shared"] and vma["kind"] in REGISTERED_KINDS
                    and vma["prot"][0] == "r"):
                try:
                    uffd_ioctl(self.uffd, UFFDIO_REGISTER, vma["start"], vma["end"] - vma["start"],
                               UFFDIO_REGISTER_MODE_WP, 0)
                except OSError:
                    continue  # e.g. registered by the process itself: copied now instead
                if self._registered and self._registered[-1][1] == vma["start"]:
                    self._registered[-1] = (self._registered[-1][0], vma["end"])
                else:
                    self._registered.append((vma["start"], vma["end"]))
        if not self._registered:
            return False
        try:
            for start, end in self._registered:
                uffd_ioctl(self.uffd, UFFDIO_WRITEPROTECT, start, end - start,
                           UFFDIO_WRITEPROTECT_MODE_WP)
        except OSError:
            return False
        self._live, early = _split(ranges, self._registered)
        self._copy_early(early, unreadable)
        pieces = sorted(self._live + early)
        self.batches = list(memory.split_batches([(a, e - a) for a, e in pieces]))
        self._ends = [batch[-1][0] + batch[-1][1] for batch in self.batches]
        return True

    def _copy_early(self, early: list[tuple[int, int]], unreadable: list[tuple[int, int]]):
        total = sum(end - start for start, end in early)
        if not total:
            return
        self._early_buf = mmap.mmap(-1, total)
        offset = 0
        for start, end in early:
            self._early.append((start, end, offset))
            offset += end - start
        reader = memory.MemoryReader(self.pid, unreadable)
        offset = 0
        try:
            with memoryview(self._early_buf) as view:
                for batch in memory.split_batches([(a, e - a) for a, e in early]):
                    size = sum(length for _, length in batch)
                    reader.read(batch, view[offset:offset + size])
                    offset += size
        finally:
            reader.close()

    def start(self) -> None:
        """Start serving write faults; call before the target is thawed."""
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"uffd-{self.pid}", daemon=True)
        with starting_threads("hpccr's write fault handler"):
            self._thread.start()

    # --- the copier: memory.copy_pages() calls read() batch after batch ----------------------

    def read(self, batch: list[tuple[int, int]], view: memoryview) -> None:
        try:
            memory.read_runs(self.pid, batch, view, self._read_early if self._early else None)
        except OSError as exc:
            raise SnapshotLost(f"reading memory: {exc.strerror}") from None
        self._settle(batch, view)

    def _read_early(self, addr: int, part: memoryview) -> bool:
        """A run copied inside the freeze (_copy_early) comes from that copy."""
        i = bisect.bisect_right(self._early, (addr, float("inf"))) - 1
        if i < 0 or self._early[i][1] <= addr:
            return False
        start, _, at = self._early[i]
        part[:] = self._early_buf[at + addr - start:at + addr - start + len(part)]
        return True

    def _settle(self, batch: list[tuple[int, int]], view: memoryview) -> None:
        """Put the handler's saved copies over the pages just read; un-protect the batch."""
        end = batch[-1][0] + batch[-1][1]
        with self._lock:
            if self._lost:
                raise SnapshotLost(self._lost)
            saved = self._saved.pop(bisect.bisect_left(self._ends, end), [])
            self._done = end
        self._put_saved(batch, view, saved)
        if self.tracked:
            return  # protected still: see the module's docstring
        for start, stop in self._registered:
            if start < end and stop > batch[0][0]:
                lo = max(start, batch[0][0])
                self._unprotect_settled(lo, min(stop, end) - lo)

    @staticmethod
    def _put_saved(batch: list[tuple[int, int]], view: memoryview, saved: list) -> None:
        if saved:
            addrs, offsets, offset = [], [], 0
            for addr, length in batch:
                addrs.append(addr)
                offsets.append(offset)
                offset += length
            for addr, data in saved:  # each inside one run
                i = bisect.bisect_right(addrs, addr) - 1
                at = offsets[i] + addr - addrs[i]
                view[at:at + len(data)] = data

    def _unprotect_settled(self, start: int, length: int) -> None:
        """Un-protect (and wake) a range; EAGAIN means a mapping change is being reported to
        the handler, which clears it."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            try:
                uffd_ioctl(self.uffd, UFFDIO_WRITEPROTECT, start, length, 0)
                return
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise SnapshotLost(f"un-protecting {start:#x}: {exc.strerror}") from None
            with self._lock:
                if self._lost:
                    raise SnapshotLost(self._lost)
            if time.monotonic() > deadline:
                raise SnapshotLost("the target's mappings did not settle")
            time.sleep(0.0002)

    def finish(self) -> None:
        """After the last batch: unregister, wait until no mapping change is still on its way to
        the handler, and raise SnapshotLost if the snapshot did not hold. (A tracked snapshot
        does this in release().)"""
        if self.tracked:
            return
        self._unregister()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        probe = self._registered[0][0]
        while True:  # EAGAIN while a REMOVE/UNMAP/REMAP event is pending
            try:
                uffd_ioctl(self.uffd, UFFDIO_WRITEPROTECT, probe, PAGE, 0)
            except OSError as exc:
                if exc.errno == errno.EAGAIN and not self._lost:
                    if time.monotonic() > deadline:
                        raise SnapshotLost("the target's mappings did not settle") from None
                    time.sleep(0.0002)
                    continue
            break
        self._stop_handler()
        if self._lost:
            raise SnapshotLost(self._lost)

    def release(self) -> list[tuple[int, int]]:
        """For a tracked snapshot, with the process frozen (so that every mapping change has
        been read: the thread that made it waits until it is): unregister, and return the
        spans written or changed since the freeze. SnapshotLost if the snapshot did not hold."""
        self._stop_handler()
        with self._lock:
            self._take_messages()
        if self._lost:
            raise SnapshotLost(self._lost)
        self._unregister()
        return union(self._touched, [])

    def _unregister(self) -> None:
        if self._unregistered:
            return
        self._unregistered = True
        failed = None
        for start, end in self._registered:
            try:
                uffd_ioctl(self.uffd, UFFDIO_UNREGISTER, start, end - start)
            except OSError as exc:
                failed = exc  # e.g. the mm is gone: the process exited or exec'd
        if failed is not None:
            raise SnapshotLost(f"unregistering: {failed.strerror}")

    def close(self) -> None:
        """Release everything (at any point, also after a failure): the target is left without
        registration, write protection or waiting threads."""
        self._stop_handler()
        try:
            self._unregister()
        except SnapshotLost:
            pass  # closing the descriptor below unregisters all the same
        os.close(self.uffd)
        if self._early_buf is not None:
            self._early_buf.close()
            self._early_buf = None

    # --- the fault handler thread --------------------------------------------------------

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        waiting: list[tuple[int, int]] = []  # ranges to un-protect (EAGAIN so far)
        try:
            while True:
                ready = dict(poller.poll(1 if waiting else None))
                if self._stop in ready:
                    return
                with self._lock:
                    waiting += self._take_messages()
                waiting = [span for span in dict.fromkeys(waiting) if not self._release(*span)]
        except BaseException as exc:  # the copier sees it; close() wakes whoever waits
            with self._lock:
                self._lost = self._lost or f"fault handler failed: {exc}"

    def _take_messages(self) -> list[tuple[int, int]]:
        """Read every pending message (under the lock); returns the (start, length) ranges to
        un-protect for the write faults, their content saved."""
        spans = []
        while True:
            try:
                data = os.read(self.uffd, UFFD_MSG.size * 64)
            except BlockingIOError:
                return spans
            for event, a, b, c in UFFD_MSG.iter_unpack(data):
                if self.tracked and event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
                    self._touched.append((a, b))
                elif self.tracked and event == UFFD_EVENT_REMAP:
                    self._touched += [(a, a + c), (b, b + c)]
                if event == UFFD_EVENT_PAGEFAULT:
                    spans.append(self._save(b & ~(PAGE - 1)))
                elif event == UFFD_EVENT_REMOVE:
                    if overlaps(self._live, max(a, self._done), b):
                        self._lost = self._lost or f"memory at {a:#x} was released (madvise)"
                elif event == UFFD_EVENT_UNMAP:
                    if overlaps(self._live, a, b):
                        self._lost = self._lost or f"memory at {a:#x} was unmapped"
                elif event == UFFD_EVENT_REMAP:
                    if overlaps(self._live, a, a + c) or overlaps(self._live, b, b + c):
                        self._lost = self._lost or f"memory at {a:#x} was moved (mremap)"

    def _save(self, page: int) -> tuple[int, int]:
        """Keep the content of the block of a page about to be written, as far as the copier
        still needs it; returns the range to un-protect: that block, inside its registered span.

        A whole block at once: a writer sweeping through memory faults once per block."""
        i = bisect.bisect_right(self._registered, (page, float("inf"))) - 1
        if i < 0 or self._registered[i][1] <= page:
            return page, PAGE  # not ours (moved by mremap?): let the writer go
        lo = max(page & ~(BLOCK - 1), self._registered[i][0])
        hi = min((page & ~(BLOCK - 1)) + BLOCK, self._registered[i][1])
        if self._lost or lo in self._handled:
            return lo, hi - lo
        self._handled.add(lo)
        if self.tracked:
            self._touched.append((lo, hi))
        pieces = []  # the live pages of the block not copied yet, cut at batch ends
        j = max(bisect.bisect_right(self._live, (lo, float("inf"))) - 1, 0)
        while j < len(self._live) and self._live[j][0] < hi:
            start, end = max(self._live[j][0], lo, self._done), min(self._live[j][1], hi)
            while start < end:
                k = bisect.bisect_right(self._ends, start)
                stop = min(end, self._ends[k])
                pieces.append((k, start, stop))
                start = stop
            j += 1
        if pieces:
            buf = bytearray(sum(stop - start for _, start, stop in pieces))
            try:
                native.read_ranges(
                    self.pid, native.ffi.new("unsigned long long[]", [p[1] for p in pieces]),
                    native.ffi.new("unsigned long long[]", [p[2] - p[1] for p in pieces]),
                    len(pieces), buf)
            except OSError as exc:
                self._lost = f"saving the memory at {lo:#x}: {exc.strerror}"
                return lo, hi - lo
            view, offset = memoryview(buf), 0
            for k, start, stop in pieces:
                self._saved.setdefault(k, []).append((start, view[offset:offset + stop - start]))
                offset += stop - start
        return lo, hi - lo

    def _release(self, start: int, length: int) -> bool:
        """Un-protect a range, which wakes the writers waiting in it; False to retry (EAGAIN)."""
        try:
            uffd_ioctl(self.uffd, UFFDIO_WRITEPROTECT, start, length, 0)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            try:  # no longer registered (unmapped meanwhile): just wake the writers
                uffd_ioctl(self.uffd, UFFDIO_WAKE, start, length)
            except OSError:
                pass
        return True

    def _stop_handler(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        if self._stop >= 0:
            os.close(self._stop)
            self._stop = -1
