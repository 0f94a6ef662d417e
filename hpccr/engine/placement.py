"""Placing a restored process's pages with userfaultfd (UFFDIO_COPY).

process_vm_writev into fresh memory faults each page in, and the kernel zeroes every page before
the copy overwrites it: in a VM that costs more than the copy (2 GiB, measured here: written in
0.8-1.4 s, placed in 0.5 s).  UFFDIO_COPY allocates each page with its data.  The range must be
registered (missing mode) with a userfaultfd of the target's mm, made inside the target while it
is still the stub.  Only private anonymous VMAs can be; of those, one the kernel would back with
huge pages on a fault (THP "always", or MADV_HUGEPAGE under "madvise") is not: UFFDIO_COPY
places small pages, and the process's memory gets huge pages as its own did.

The userfaultfd is made with UFFD_USER_MODE_ONLY: a fault from the kernel on a registered page
not yet there (a write of hpccr's, a system call of the target's) fails at once instead of
waiting for a handler, so nothing can hang on it.  hpccr alone holds it (the target's descriptor
is closed at once, Injector.take_fd), and closes it before the process runs, which unregisters
every VMA; so does the kernel if hpccr dies.
"""

from __future__ import annotations

import contextlib
import os

from hpccr.engine.snapshot import (
    REGISTERED_KINDS,
    UFFD_API,
    UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_UNMAP,
    UFFDIO_API,
    UFFDIO_REGISTER,
    uffd_ioctl,
)
from hpccr.spans import Spans, intersect, subtract

UFFD_USER_MODE_ONLY = 1
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_FEATURE_EVENT_FORK = 1 << 1
# What a lazy restore must hear of: a child forked meanwhile (its own userfaultfd, the same
# pages missing), memory moved (mremap), dropped (MADV_DONTNEED: zeros now) or unmapped.
LAZY_FEATURES = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE
                 | UFFD_FEATURE_EVENT_UNMAP)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


class Placer:
    """A userfaultfd of one restored process's mm, its `registered` VMAs (address order)."""

    def __init__(self, uffd: int, registered: Spans):
        self.uffd = uffd
        self.registered = registered

    @classmethod
    def open(cls, inj, vmas: list[dict], lazy: bool = False) -> Placer | None:
        """For the freshly mapped `vmas` of the stub of injector `inj`; None where no VMA can be
        registered or the kernel gives no such userfaultfd: the pages are written instead.
        `lazy`: for lazy.py, whose job runs before its pages are in: a kernel access waits for
        its page like the job's own, and the job's changes to its memory are reported."""
        huge = _huge_on_fault()
        wanted = [v for v in vmas if v["saved_pages"] and not v["shared"]
                  and v["kind"] in REGISTERED_KINDS and not huge(v["advice"])
                  and not (lazy and "wf" in v["advice"])]  # a child's would be wiped, not lazy
        if not wanted:
            return None
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (0 if lazy else UFFD_USER_MODE_ONLY)
        try:
            uffd = inj.take_fd("userfaultfd", flags)
        except OSError:
            return None  # before 5.11 (no UFFD_USER_MODE_ONLY), or refused (seccomp, sysctl)
        registered = []
        with contextlib.suppress(OSError):
            uffd_ioctl(uffd, UFFDIO_API, UFFD_API, LAZY_FEATURES if lazy else 0, 0)
            for v in wanted:
                with contextlib.suppress(OSError):
                    uffd_ioctl(uffd, UFFDIO_REGISTER, v["start"], v["end"] - v["start"],
                               UFFDIO_REGISTER_MODE_MISSING, 0)
                    registered.append((v["start"], v["end"]))
        if not registered:
            os.close(uffd)
            return None
        return cls(uffd, sorted(registered))

    def split(self, pieces: Spans) -> Spans:
        """`pieces` (sorted, disjoint) cut where a registered VMA begins or ends: each lies
        inside one of them or outside them all, as hpccr_place_ranges needs."""
        return sorted(intersect(pieces, self.registered) + subtract(pieces, self.registered))

    def close(self) -> None:
        os.close(self.uffd)


def _huge_on_fault():
    """A test of a VMA's saved advice: would a fault in it here get a huge page."""
    try:
        with open(THP_ENABLED) as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "never"
    if mode == "always":
        return lambda advice: "nh" not in advice
    if mode == "madvise":
        return lambda advice: "hg" in advice
    return lambda advice: False
