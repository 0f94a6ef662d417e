"""Pages written between checkpoints, for incremental checkpoints (DESIGN §3b).

A Tracker holds, in the checkpointer alone, a userfaultfd of one process's mm in write-protect
*async* mode (UFFD_FEATURE_WP_ASYNC): the kernel resolves each first write to a protected page
itself, in about half a microsecond, and marks the page written. At the next checkpoint a
PAGEMAP_SCAN of those ranges, VMA by VMA (category PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING),
returns exactly the pages written since they were protected and protects them again. The job never
waits for hpccr: should hpccr die, its descriptor closes and the registration goes with it.

What a tracker promises is kept in two lists of address spans since its `base`, the image whose
memory it counts from: `covered`, where every write is either in `written` or will show in the
next scan, and `written`. A page of a checkpoint may be left to the parent image only if it lies
in `covered` and not in `written` nor in the scan, and the parent holds it (dump.py checks the
last against the parent's own page lists). Whatever a tracker cannot vouch for (a range mapped,
moved or re-mapped since, a process that exec'd) falls outside `covered` and is saved again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from hpccr import faults, native
from hpccr.engine import memory, procfs, snapshot
from hpccr.engine.tracer import FrozenProcess
from hpccr.errors import HpccrError
from hpccr.spans import Spans, intersect, subtract, union

PAGE = native.PAGE_SIZE

# linux/userfaultfd.h and linux/fs.h of 6.7+ (newer than Debian 12's headers)
UFFD_FEATURE_WP_ASYNC = 1 << 15
# Not WP_UNPOPULATED: its markers on never-touched pages show in /proc/PID/pagemap as swapped
# pages, which a dump would save (zeros). Without it a page first touched after the protection
# is not protected, and so shows as written: saved again, as it must be.
FEATURES = UFFD_FEATURE_WP_ASYNC

# --- the tracker of one process --------------------------------------------------------------

def trackable(pid: int) -> Spans:
    """The spans of the VMAs whose writes can be tracked: private anonymous memory (write
    protection refuses file mappings; shared memory is written through other page tables)."""
    spans: Spans = []
    for entry in procfs.maps(pid):
        if not entry.shared and memory.kind_of(entry) in snapshot.REGISTERED_KINDS:
            spans.append((entry.start, entry.end))
    return spans


class Tracker:
    def __init__(self, pid: int, uffd: int, starttime: str):
        self.pid = pid
        self.uffd = uffd
        self.starttime = starttime  # the process, not a later one with its pid
        self.spans: Spans = []  # registered with our descriptor
        self.covered: Spans = []
        self.written: Spans = []
        self.base: str | None = None  # the image (its checksums' digest) counted from
        self.held: Spans | None = None  # where that image holds pages of this process
        self._protected: Spans = []  # VMAs the last scan protected again, for arm()

    @classmethod
    def open(cls, pid: int, inj) -> Tracker | None:
        """A tracker for the frozen process `pid` (its injector `inj`), not armed yet; None
        where the kernel or the process does not allow one (its pages are then saved whole)."""
        uffd = snapshot.take_userfaultfd(pid, inj, FEATURES)
        if uffd is None:
            return None
        return cls(pid, uffd, procfs.stat(pid)[22])

    def same_process(self, pid: int) -> bool:
        try:
            return pid == self.pid and procfs.stat(pid)[22] == self.starttime
        except OSError:
            return False

    def arm(self, vmas: Spans) -> None:
        """Register the VMAs at `vmas` (trackable(), read while the process cannot write:
        frozen) and write-protect them, but for those a scan just protected again; `spans`
        are those now tracked."""
        protected = self._protected
        self._protected = []
        registered: Spans = []
        for start, end in vmas:
            try:  # already ours: nothing changes
                snapshot.uffd_ioctl(self.uffd, snapshot.UFFDIO_REGISTER, start, end - start,
                                    snapshot.UFFDIO_REGISTER_MODE_WP, 0)
            except OSError:
                continue  # e.g. the process's own userfaultfd: saved whole every time
            registered.append((start, end))
        for start, end in subtract(registered, protected):
            try:
                snapshot.uffd_ioctl(self.uffd, snapshot.UFFDIO_WRITEPROTECT, start, end - start,
                                    snapshot.UFFDIO_WRITEPROTECT_MODE_WP)
            except OSError:
                registered = subtract(registered, [(start, end)])
        self.spans = union(registered, [])

    def scan(self) -> None:
        """Add the pages written since they were protected to `written`, and protect them
        again. A VMA that is not ours as registered (mapped or moved since) leaves `covered`,
        and all of them do for a process with pinned pages (a device writes those behind the
        page tables) or one that exec'd."""
        if snapshot.pinned(self.pid):
            self.covered = []
        vmas = [(entry.start, entry.end) for entry in procfs.maps(self.pid)]
        fd = os.open(procfs.path(self.pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
        found: Spans = []
        try:
            for start, end in intersect(vmas, self.spans):  # VMA by VMA
                try:
                    found += self._scan_span(fd, start, end)
                    self._protected.append((start, end))
                except OSError:
                    self.covered = subtract(self.covered, [(start, end)])
        finally:
            os.close(fd)
        if not self._mm_alive():
            self.covered = []  # the pagemap just read was another mm's
            self._protected = []
        self.written = union(self.written, found)

    def _mm_alive(self) -> bool:
        """Whether our descriptor still speaks for the process's memory: after an exec (or
        exit) its mm is gone and every ioctl on it fails with ESRCH. (It protects a page
        again: only after a scan, which protected every page it looked at.)"""
        if not self.spans:
            return False
        try:
            snapshot.uffd_ioctl(self.uffd, snapshot.UFFDIO_WRITEPROTECT, self.spans[0][0], PAGE,
                                snapshot.UFFDIO_WRITEPROTECT_MODE_WP)
        except OSError as exc:
            return exc.errno != errno.ESRCH  # ENOENT: that page is no longer registered
        return True

    def _scan_span(self, fd: int, start: int, end: int) -> Spans:
        """The pages written in [start, end), protected again as they are reported."""
        regions = procfs.pagemap_scan(
            fd, start, end, flags=procfs.PM_SCAN_WP_MATCHING | procfs.PM_SCAN_CHECK_WPASYNC,
            required=procfs.PAGE_IS_WRITTEN, returned=procfs.PAGE_IS_WRITTEN)
        return [(first, last) for first, last, _ in regions]

    def disarm(self) -> None:
        """Unregister every span (their pages are no longer protected), for a snapshot."""
        for start, end in self.spans:
            try:
                snapshot.uffd_ioctl(self.uffd, snapshot.UFFDIO_UNREGISTER, start, end - start)
            except OSError:
                pass  # unmapped meanwhile, or the mm is gone
        self.spans = []
        self._protected = []

    def close(self) -> None:
        if self.uffd >= 0:
            os.close(self.uffd)  # the kernel unregisters what is left
            self.uffd = -1


def hand_over(snap: snapshot.Snapshot, pid: int, tracker: Tracker) -> None:
    """After the copy of a running dump's snapshot (which kept every page it had protected
    protected, noting each one written and each mapping change): with the process frozen
    for a moment, its memory goes from the snapshot's descriptor to the tracker's, so that no
    write falls between the two. SnapshotLost if the snapshot did not hold."""
    frozen = FrozenProcess(pid)
    try:
        frozen.freeze()
    except HpccrError as exc:
        raise snapshot.SnapshotLost(f"freezing it again: {exc}") from None
    try:
        written = snap.release()  # raises SnapshotLost
        faults.point("hand_over")
        tracker.arm(trackable(frozen.reader))
        tracker.covered = intersect(tracker.spans, snap.registered)
        tracker.written = written
    finally:
        frozen.thaw()


class Tracking:
    """The trackers of one job's checkpoints (host pid -> Tracker), kept from one checkpoint
    to the next by whoever takes them (hpccr run, a Slurm job's agent). A checkpoint leaves to
    its `parent`, the previous one, the pages that did not change; every `full_every`-th is
    full, so that chains stay short."""

    def __init__(self, full_every: int):
        self.full_every = full_every
        self.trackers: dict[int, Tracker] = {}
        self.parent: Path | None = None  # the last checkpoint taken with them
        self.length = 0  # of the chain up to `parent`: 1 for a full image
        self.copy_buffers: list = []  # kept from one dump to the next (memory.copy_pages)

    def next_parent(self) -> Path | None:
        """The image the next checkpoint may leave pages to; None: the next one is full."""
        if self.parent is None or self.length >= self.full_every or not self.parent.is_dir():
            return None
        return self.parent

    def tracker(self, pid: int) -> Tracker | None:
        """The tracker of process `pid`, unless that pid is now another process's."""
        tracker = self.trackers.get(pid)
        if tracker is not None and not tracker.same_process(pid):
            tracker.close()
            del self.trackers[pid]
            return None
        return tracker

    def committed(self, path: Path, digest: str, incremental: bool,
                  trackers: dict[int, Tracker]) -> None:
        """A checkpoint at `path` is complete: `trackers` (those of its processes) count from
        it now; the others are closed."""
        for pid, tracker in self.trackers.items():
            if trackers.get(pid) is not tracker:
                tracker.close()
        for tracker in trackers.values():
            tracker.base = digest
        self.trackers = dict(trackers)
        self.parent = path
        self.length = self.length + 1 if incremental else 1

    def reset(self) -> None:
        """After a failed checkpoint (or the last): nothing is vouched for any more; the next is
        full, and the buffers kept for it are let go."""
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers = {}
        self.parent = None
        self.length = 0
        memory.close_buffers(self.copy_buffers)
        self.copy_buffers = []
