"""`hpccr check`: which kernel features hpccr needs or can use are present here, and a verdict.

Every probe really makes the kernel call it is about, on a throwaway child process it creates
(or, for kcmp, userfaultfd and PAGEMAP_SCAN, on descriptors and memory of this process only).
The runner gives each probe a deadline (SIGALRM) and then, with the timer off, kills and reaps
every child the probe made, so nothing is left behind or stopped under ptrace.  A probe that
raises is reported as missing with the error text.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hpccr import config, native
from hpccr.engine import cpu, gpu, posix_timers, procfs
from hpccr.engine.placement import UFFD_FEATURE_EVENT_FORK, UFFD_USER_MODE_ONLY
from hpccr.engine.restore import MM_MAP, PR_SET_MM, PR_SET_MM_MAP
from hpccr.engine.snapshot import (
    UFFD_API,
    UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_UNMAP,
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_WP,
)
from hpccr.engine.tracking import UFFD_FEATURE_WP_ASYNC
from hpccr.errors import CheckFailed
from hpccr.image.show import cuda_release

PROBE_TIMEOUT = 5.0
OK, MISSING, NEEDS_ROOT = "ok", "missing", "needs-root"
DUMP, RESTORE = "dump", "restore"

PR_SET_PDEATHSIG = 1
PR_SET_MM_MAP_SIZE = 15  # (13 is PR_SET_MM_EXE_FILE, which needs CAP_SYS_RESOURCE)
EXE_FD_UNCHANGED = 0xFFFFFFFF
CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_CHECKPOINT_RESTORE = 19, 21, 24, 40

PM_PRESENT = 1 << 63
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1


# userfaultfd (linux/userfaultfd.h)
UFFD_FEATURES = {"EVENT_FORK": UFFD_FEATURE_EVENT_FORK, "EVENT_REMAP": UFFD_FEATURE_EVENT_REMAP,
                 "EVENT_REMOVE": UFFD_FEATURE_EVENT_REMOVE, "EVENT_UNMAP": UFFD_FEATURE_EVENT_UNMAP,
                 "WP_UNPOPULATED": 1 << 13, "WP_ASYNC": UFFD_FEATURE_WP_ASYNC}

# XCR0 components, grouped as people name them
XFEATURE_GROUPS = (("x87", 1 << 0), ("SSE", 1 << 1), ("AVX", 1 << 2), ("MPX", 0b11 << 3),
                   ("AVX-512", 0b111 << 5), ("PKRU", 1 << 9), ("CET", 1 << 11),
                   ("AMX", 0b11 << 17), ("APX", 1 << 19))
# asm/user.h: in NT_X86_XSTATE, bytes 464..471 (the first software-reserved word) hold XCR0.
XSTATE_XCR0 = 464
XCR0_X87_SSE = 0b11


class ProbeTimeout(Exception):
    pass


class Missing(Exception):
    """The feature does not work here; the message says why."""


class NeedsRoot(Exception):
    """The kernel has the feature but this user lacks the privilege it needs."""


@dataclass
class Probe:
    name: str
    required: bool
    used_by: tuple[str, ...]
    run: Callable[[Scratch], tuple[str, dict]]


@dataclass
class Result:
    name: str
    required: bool
    used_by: tuple[str, ...]
    status: str
    detail: str
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "required": self.required, "used_by": list(self.used_by),
                "status": self.status, "detail": self.detail, **self.data}


PROBES: list[Probe] = []


def probe(name: str, required: bool, *used_by: str):
    def register(fn):
        PROBES.append(Probe(name, required, used_by, fn))
        return fn
    return register


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        text = exc.strerror or os.strerror(exc.errno or 0)
        return f"{exc.filename}: {text}" if exc.filename else text
    return str(exc) or type(exc).__name__


def _denied(exc: OSError) -> bool:
    return exc.errno in (errno.EPERM, errno.EACCES)


def _has_cap(cap: int) -> bool:
    return bool(int(procfs.status(os.getpid())["CapEff"], 16) & (1 << cap))


def _can_checkpoint_restore() -> bool:
    return _has_cap(CAP_CHECKPOINT_RESTORE) or _has_cap(CAP_SYS_ADMIN)


def _private_anon(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _address(buf) -> int:
    with native.ffi.from_buffer(buf) as ptr:
        return int(native.ffi.cast("uintptr_t", ptr))


def _cdata_address(cdata) -> int:
    return int(native.ffi.cast("uintptr_t", cdata))


def _sysctl(name: str) -> str:
    with open(f"/proc/sys/{name.replace('.', '/')}") as f:
        return f.read().strip()


def _sysctl_or_none(name: str) -> str | None:
    try:
        return _sysctl(name)
    except OSError:
        return None


class _AlarmBlocked:
    """No probe deadline may fire between a fork and the bookkeeping of its child."""

    def __enter__(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


class Scratch:
    """The throwaway children and descriptors of one probe; close() removes them all."""

    def __init__(self):
        self.pids: list[int] = []
        self.fds: list[int] = []
        self.answers: dict[int, int] = {}
        self.cleanups: list = []

    def keep(self, fd: int) -> int:
        """Close fd at close time; returns it."""
        self.fds.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return self.keep(r), self.keep(w)

    def close_fd(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)

    def at_close(self, fn) -> None:
        """Run fn() at close time, before the children are killed."""
        self.cleanups.append(fn)

    def child(self, body=None, pid: int | None = None) -> int:
        """Fork a child (with exactly `pid` if given, by clone3 set_tid) that runs body() and
        sends its string result (or "!error") to answer(), then sleeps until killed."""
        r, w = self.pipe()
        with _AlarmBlocked():
            new = native.fork_with_pid(pid) if pid else os.fork()
            if new == 0:
                _child_main(body, w)
            self.pids.append(new)
        self.close_fd(w)
        self.answers[new] = r
        return new

    def answer(self, pid: int) -> str:
        data = os.read(self.answers[pid], 65536).decode(errors="replace")
        if not data:
            raise Missing("the probe's child died without answering")
        if data.startswith("!"):
            raise Missing(data[1:])
        return data

    def close(self) -> None:
        """Run the clean-ups, kill and reap the children, close the descriptors."""
        while self.cleanups:
            with contextlib.suppress(OSError):
                self.cleanups[-1]()
            self.cleanups.pop()
        while self.pids:
            _kill_and_reap(self.pids[-1])
            self.pids.pop()
        while self.fds:
            os.close(self.fds.pop())


def _child_main(body, w: int) -> None:
    """Runs in a probe's child and never returns into the parent's code."""
    try:
        try:
            native.syscall("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)
            answer = body() if body else "ready"
        except BaseException as exc:  # reported to the parent, which decides
            answer = "!" + _describe(exc)
        os.write(w, answer.encode())
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            _, status = os.waitpid(pid, native.WALL)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return


class _Deadline:
    """SIGALRM after `seconds` raises ProbeTimeout inside the probe, and nowhere else."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = False

    def _fire(self, signum, frame):
        if self.armed:
            raise ProbeTimeout

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self._fire)
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.armed = False
        signal.signal(signal.SIGALRM, self.previous)


def run_probe(p: Probe) -> Result:
    scratch = Scratch()
    data: dict = {}
    try:
        with _Deadline(PROBE_TIMEOUT):
            detail, data = p.run(scratch)
        status = OK
    except ProbeTimeout:
        status, detail = MISSING, f"no answer within {PROBE_TIMEOUT:g} s"
    except NeedsRoot as exc:
        status, detail = NEEDS_ROOT, str(exc)
    except Missing as exc:
        status, detail = MISSING, str(exc)
    except Exception as exc:  # a probe that fails for any reason reports it, never a traceback
        status, detail = MISSING, _describe(exc)
    finally:
        scratch.close()
    return Result(p.name, p.required, p.used_by, status, detail, data)


# --- helpers shared by probes --------------------------------------------------------------


def _seized(scratch: Scratch) -> int:
    """A child seized and stopped in PTRACE_EVENT_STOP by PTRACE_INTERRUPT."""
    pid = scratch.child()
    scratch.answer(pid)
    native.seize(pid)
    native.interrupt(pid)
    _, status = os.waitpid(pid, native.WALL)
    if not (os.WIFSTOPPED(status) and status >> 16 == native.PTRACE_EVENT_STOP):
        raise Missing(f"PTRACE_INTERRUPT gave wait status {status:#x}, not an event stop")
    return pid


def _free_pids(count: int = 20):
    """Pids well ahead of the allocator's last one that no task uses now."""
    last, pid_max = int(_sysctl("kernel.ns_last_pid")), int(_sysctl("kernel.pid_max"))
    candidate, found = last + 100, 0
    while found < count:
        if candidate >= pid_max:
            candidate = 300
        if not os.path.exists(procfs.path(candidate)):
            found += 1
            yield candidate
        candidate += 1


def _pagemap_entries(pid: int, addr: int, pages: int) -> list[int]:
    fd = procfs.pagemap_fd(pid)
    try:
        data = os.pread(fd, 8 * pages, addr // native.PAGE_SIZE * 8)
    finally:
        os.close(fd)
    return list(struct.unpack(f"<{pages}Q", data))


def _mapped_file(pid: int) -> procfs.MapsEntry:
    for e in procfs.maps(pid):
        if e.name.startswith("/") and not e.deleted:
            return e
    raise Missing(f"child {pid} has no file mapping to look at")


# --- required ------------------------------------------------------------------------------


@probe("ptrace_seize", True, DUMP)
def _ptrace_seize(scratch: Scratch):
    pid = _seized(scratch)
    regs = native.get_regs(pid)
    return f"seized and interrupted a child (event stop at rip {regs.rip:#x})", {}


@probe("xstate", True, DUMP, RESTORE)
def _xstate(scratch: Scratch):
    pid = _seized(scratch)
    xstate = native.get_xstate(pid)
    xcr0 = struct.unpack_from("<Q", xstate, XSTATE_XCR0)[0]
    if xcr0 & XCR0_X87_SSE != XCR0_X87_SSE or cpu.features_in_use(xstate) & ~xcr0:
        raise Missing(f"NT_X86_XSTATE of {len(xstate)} bytes has no XCR0 at offset "
                      f"{XSTATE_XCR0} ({xcr0:#x})")
    native.set_xstate(pid, xstate)
    names = [name for name, mask in XFEATURE_GROUPS if xcr0 & mask]
    return (f"{len(xstate)} bytes, XCR0 {xcr0:#x} ({' '.join(names)}); SETREGSET accepts it",
            {"xstate_size": len(xstate), "xcr0": xcr0, "xfeatures": names})


@probe("process_vm", True, DUMP, RESTORE)
def _process_vm(scratch: Scratch):
    size = 2 * native.PAGE_SIZE
    with _private_anon(size) as area:
        area[:] = bytes(range(256)) * (size // 256)
        pid = scratch.child()
        scratch.answer(pid)
        addr = _address(area)
        if native.read_mem(pid, addr, size) != area[:]:
            raise Missing("process_vm_readv returned other bytes than the child holds")
        new = b"\xa5" * size
        native.write_mem(pid, addr, new)
        if native.read_mem(pid, addr, size) != new:
            raise Missing("process_vm_writev did not change the child's memory")
    return f"read and wrote {size // 1024} KiB of a child", {}


@probe("pagemap", True, DUMP)
def _pagemap(scratch: Scratch):
    with _private_anon(2 * native.PAGE_SIZE) as area:
        def touch_first_page():
            area[0] = 1
            return "ready"
        pid = scratch.child(touch_first_page)
        scratch.answer(pid)
        touched, untouched = _pagemap_entries(pid, _address(area), 2)
    if not touched & PM_PRESENT or untouched & PM_PRESENT:
        raise Missing(f"present bit wrong: {touched:#x} (written page), {untouched:#x} (unused)")
    pfns = "shown" if touched & PM_PFN_MASK else "hidden (not needed)"
    return f"present bit right for a written and an unused page; PFNs {pfns}", {}


@probe("map_files", True, DUMP)
def _map_files(scratch: Scratch):
    pid = scratch.child()
    scratch.answer(pid)
    e = _mapped_file(pid)
    link = procfs.path(pid, "map_files", f"{e.start:x}-{e.end:x}")
    if os.readlink(link) != e.name:
        raise Missing(f"{link} does not name {e.name}")
    try:
        st = os.stat(link)
    except OSError as exc:
        if _denied(exc) and not _can_checkpoint_restore():
            raise NeedsRoot("listing and readlink work; following a link (done by dump) needs "
                            "CAP_CHECKPOINT_RESTORE") from None
        raise
    if st.st_ino != e.inode:
        raise Missing(f"{link} leads to inode {st.st_ino}, maps says {e.inode}")
    return f"readlink and stat through map_files of {e.name}", {}


@probe("clone3_set_tid", True, RESTORE)
def _clone3_set_tid(scratch: Scratch):
    for want in _free_pids():
        try:
            pid = scratch.child(lambda: str(native.syscall("getpid")), pid=want)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue  # taken meanwhile
            if _denied(exc) and not _can_checkpoint_restore():
                raise NeedsRoot("clone3 with set_tid needs CAP_CHECKPOINT_RESTORE: restore "
                                "needs root") from None
            raise
        got = int(scratch.answer(pid))
        if got != want:
            raise Missing(f"asked for pid {want}, the child has pid {got}")
        return f"created a child with the chosen pid {want}", {}
    raise Missing("every pid tried was taken meanwhile")


def _set_mm_map_in_child() -> str:
    """Runs in a child: PR_SET_MM_MAP with its own current layout, without and with exe_fd."""
    me = os.getpid()
    stat = procfs.stat(me)
    auxv = native.ffi.new("char[]", procfs.auxv(me))
    layout = [int(stat[i]) for i in (26, 27, 45, 46, 47)] + [native.syscall("brk", 0)] + \
             [int(stat[i]) for i in (28, 48, 49, 50, 51)]

    def attempt(exe_fd: int) -> int:
        mm_map = native.ffi.new("char[]", MM_MAP.pack(*layout, _cdata_address(auxv),
                                                       len(auxv), exe_fd))
        try:
            native.syscall("prctl", PR_SET_MM, PR_SET_MM_MAP, _cdata_address(mm_map),
                           MM_MAP.size, 0)
        except OSError as exc:
            return exc.errno
        return 0

    return f"{attempt(EXE_FD_UNCHANGED)} {attempt(os.open('/proc/self/exe', os.O_RDONLY))}"


@probe("pr_set_mm_map", True, RESTORE)
def _pr_set_mm_map(scratch: Scratch):
    size = native.ffi.new("unsigned int *")
    native.syscall("prctl", PR_SET_MM, PR_SET_MM_MAP_SIZE, _cdata_address(size), 0, 0)
    if size[0] != MM_MAP.size:
        raise Missing(f"the kernel's struct prctl_mm_map is {size[0]} bytes, "
                      f"hpccr's {MM_MAP.size}")
    pid = scratch.child(_set_mm_map_in_child)
    layout_err, exe_err = (int(x) for x in scratch.answer(pid).split())
    if layout_err:
        raise Missing(f"PR_SET_MM_MAP refused a child's own layout: {os.strerror(layout_err)}")
    # The old exe is still mapped in the child, so an allowed exe change stops at EBUSY.
    if exe_err in (errno.EPERM, errno.EACCES):
        raise NeedsRoot("PR_SET_MM_MAP works, but setting the exe link (done by restore) needs "
                        "CAP_CHECKPOINT_RESTORE")
    if exe_err not in (0, errno.EBUSY):
        raise Missing(f"PR_SET_MM_MAP with exe_fd: {os.strerror(exe_err)}")
    return f"struct size {size[0]}; a child re-set its own layout, exe_fd change allowed", {}


@probe("kcmp", True, DUMP)
def _kcmp(scratch: Scratch):
    me = os.getpid()
    first = scratch.keep(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    dup = scratch.keep(os.dup(first))
    other = scratch.keep(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    if native.kcmp(me, me, native.KCMP_FILE, first, dup) != 0:
        raise Missing("KCMP_FILE says two dup'd descriptors differ")
    if native.kcmp(me, me, native.KCMP_FILE, first, other) == 0:
        raise Missing("KCMP_FILE says two separate opens are the same file")
    return "KCMP_FILE tells dup'd descriptors from separate opens", {}


@probe("pidfd_getfd", True, DUMP)
def _pidfd_getfd(scratch: Scratch):
    r, w = scratch.pipe()
    pid = scratch.child()
    scratch.close_fd(w)  # from now on only the child holds the write end
    scratch.answer(pid)
    pidfd = scratch.keep(os.pidfd_open(pid))
    copy = scratch.keep(native.syscall("pidfd_getfd", pidfd, w, 0))
    os.write(copy, b"x")
    if os.read(r, 1) != b"x":
        raise Missing("the descriptor pidfd_getfd returned is not the child's")
    return "pidfd_open, then pidfd_getfd copied a child's pipe end (data went through)", {}


@probe("rseq_config", True, DUMP)
def _rseq_config(scratch: Scratch):
    config = native.rseq_config(_seized(scratch))
    if config is None:
        return "works (the child has no rseq area registered)", {}
    return f"the child's rseq area: {config['len']} bytes, signature {config['sig']:#x}", {}


# --- optional ------------------------------------------------------------------------------


@probe("ns_last_pid", False, "restore fallback to set_tid")
def _ns_last_pid(scratch: Scratch):
    try:
        fd = scratch.keep(os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC))
        fcntl.flock(fd, fcntl.LOCK_EX)  # as CRIU does: one pid steering at a time
        for want in _free_pids(5):
            os.pwrite(fd, str(want - 1).encode(), 0)  # sysctls ignore writes past offset 0
            if scratch.child() == want:
                return f"writable: the next fork got the chosen pid {want}", {}
    except OSError as exc:
        if _denied(exc) and not _can_checkpoint_restore():
            raise NeedsRoot("writing it needs CAP_CHECKPOINT_RESTORE") from None
        raise
    raise Missing("writable, but other forks took the chosen pid every time")


def _uffd_api(fd: int, features: int) -> int:
    arg = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, arg)
    return struct.unpack_from("<Q", arg, 8)[0]


@probe("userfaultfd", False, "incremental checkpoints", "snapshots",
       "restores that place pages instead of writing them", "lazy restores (restore --lazy)")
def _userfaultfd_probe(scratch: Scratch):
    sysctl = _sysctl_or_none("vm.unprivileged_userfaultfd")
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = scratch.keep(native.syscall("userfaultfd", flags))
        mode = "full"
    except OSError as exc:
        if not _denied(exc):
            raise
        flags |= UFFD_USER_MODE_ONLY
        fd = scratch.keep(native.syscall("userfaultfd", flags))
        mode = "user-mode-only"
    available = _uffd_api(fd, 0)
    have = [name for name, bit in UFFD_FEATURES.items() if available & bit]
    wp = ""
    if "WP_ASYNC" in have:
        fd = scratch.keep(native.syscall("userfaultfd", flags))  # UFFDIO_API goes once per fd
        _uffd_api(fd, UFFD_FEATURES["WP_ASYNC"] | UFFD_FEATURES["WP_UNPOPULATED"])
        with _private_anon(2 * native.PAGE_SIZE) as area:
            reg = bytearray(struct.pack("<4Q", _address(area), len(area),
                                        UFFDIO_REGISTER_MODE_WP, 0))
            fcntl.ioctl(fd, UFFDIO_REGISTER, reg)
            scratch.close_fd(fd)  # unregisters before the area goes
        wp = ", async write-protect registration works"
    return (f"{mode} fd (vm.unprivileged_userfaultfd={sysctl}), features "
            f"{' '.join(have) or 'none of ' + ' '.join(UFFD_FEATURES)}{wp}",
            {"uffd_mode": mode, "uffd_features": have, "unprivileged_userfaultfd": sysctl})


@probe("pagemap_scan", False, "incremental checkpoints")
def _pagemap_scan(scratch: Scratch):
    pages = 4
    fd = scratch.keep(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
    with _private_anon(pages * native.PAGE_SIZE) as area:
        area[0] = area[2 * native.PAGE_SIZE] = 1
        start = _address(area)
        end = start + len(area)
        try:
            found = procfs.pagemap_scan(fd, start, end, required=procfs.PAGE_IS_PRESENT,
                                        returned=procfs.PAGE_IS_PRESENT)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise Missing("the PAGEMAP_SCAN ioctl is not supported (Linux >= 6.7)") from None
            raise
    regions = [(first, last) for first, last, _ in found]
    page = native.PAGE_SIZE
    want = [(start, start + page), (start + 2 * page, start + 3 * page)]
    if regions != want:
        raise Missing(f"PAGEMAP_SCAN found {regions}, expected {want}")
    return "found exactly the 2 present pages of 4 as 2 regions", {}


def _soft_dirty_in_child() -> str:
    """Runs in a child: bit 55 of its own page after a write, after clear_refs=4, after a
    second write."""
    with _private_anon(native.PAGE_SIZE) as area:
        addr = _address(area)
        area[0] = 1
        bits = [_pagemap_entries(os.getpid(), addr, 1)[0]]
        with open(procfs.path(os.getpid(), "clear_refs"), "w") as f:
            f.write("4")
        bits.append(_pagemap_entries(os.getpid(), addr, 1)[0])
        area[0] = 2
        bits.append(_pagemap_entries(os.getpid(), addr, 1)[0])
    return " ".join("1" if b & PM_SOFT_DIRTY else "0" for b in bits)


@probe("soft_dirty", False, "incremental checkpoints")
def _soft_dirty(scratch: Scratch):
    seen = scratch.answer(scratch.child(_soft_dirty_in_child))
    if seen == "1 0 1":
        return "bit 55 set by a write, cleared by clear_refs=4, set again by the next write", {}
    if seen == "0 0 0":
        raise Missing("not compiled into this kernel: clear_refs=4 is accepted, pagemap bit 55 "
                      "is never set (PAGEMAP_SCAN + userfaultfd write-protect replace it)")
    raise Missing(f"bit 55 after write, clear, write: {seen} (expected 1 0 1)")


def _timer_ids_in_child() -> str:
    native.syscall("prctl", posix_timers.PR_TIMER_CREATE_RESTORE_IDS,
                   posix_timers.PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0)
    return "ok"


@probe("timer_restore_ids", False, "restore of POSIX timers (timer_create)")
def _timer_restore_ids(scratch: Scratch):
    scratch.answer(scratch.child(_timer_ids_in_child))
    return "prctl(PR_TIMER_CREATE_RESTORE_IDS) accepted: timers come back with their ids", {}


@probe("cap_sys_resource", False)
def _cap_sys_resource(scratch: Scratch):
    bounding = int(procfs.status(os.getpid())["CapBnd"], 16) & (1 << CAP_SYS_RESOURCE)
    note = "hpccr does not need it (PR_SET_MM_MAP works without)"
    if _has_cap(CAP_SYS_RESOURCE):
        return f"held; {note}", {}
    raise Missing(f"not held (bounding set: {'yes' if bounding else 'no'}); {note}")


def _cgroup_mounts() -> dict[str, str]:
    """Where the v1 freezer and the v2 hierarchy are mounted, joined with our own cgroup."""
    with open(procfs.path(os.getpid(), "cgroup")) as f:
        ours = {}
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else ["v2"]:
                ours[c] = path
    found = {}
    with open(procfs.path(os.getpid(), "mountinfo")) as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            fstype, _, options = tail.split()[:3]
            mount = fields.split()[4]
            if fstype == "cgroup" and "freezer" in options.split(",") and "freezer" in ours:
                found["v1"] = os.path.normpath(mount + ours["freezer"])
            elif fstype == "cgroup2" and "v2" in ours:
                found["v2"] = os.path.normpath(mount + ours["v2"])
    return found


def _freeze_child(scratch: Scratch, base: str, control: str, on: str, off: str, state: str,
                  frozen: str) -> None:
    """Put a child in a new cgroup under `base`, freeze it, wait until frozen, thaw it."""
    cg = os.path.join(base, f"hpccr-check-{os.getpid()}")
    os.mkdir(cg)

    def write(name: str, value: str) -> None:
        with open(os.path.join(cg, name), "w") as f:
            f.write(value)

    def undo() -> None:  # thawed and emptied first: a frozen v1 task does not die of SIGKILL
        with contextlib.suppress(OSError):
            write(control, off)
        for pid in scratch.pids:
            with contextlib.suppress(OSError), open(os.path.join(base, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        os.rmdir(cg)

    scratch.at_close(undo)
    pid = scratch.child()
    scratch.answer(pid)
    write("cgroup.procs", str(pid))
    write(control, on)
    while True:
        with open(os.path.join(cg, state)) as f:
            if frozen in f.read().split("\n"):
                break
        time.sleep(0.001)
    write(control, off)


@probe("cgroup_freezer", False, "freezing process trees")
def _cgroup_freezer(scratch: Scratch):
    mounts = _cgroup_mounts()
    if not mounts:
        raise Missing("neither a v1 freezer nor a v2 hierarchy is mounted")
    done, failed = [], []
    for version, base in sorted(mounts.items()):
        try:
            if version == "v1":
                _freeze_child(scratch, base, "freezer.state", "FROZEN", "THAWED",
                              "freezer.state", "FROZEN")
            else:
                _freeze_child(scratch, base, "cgroup.freeze", "1", "0", "cgroup.events",
                              "frozen 1")
            done.append(f"{version} ({base})")
        except OSError as exc:
            failed.append((version, exc))
    if done:
        return f"froze and thawed a child in {' and '.join(done)}", {"cgroup": sorted(mounts)}
    if all(_denied(exc) for _, exc in failed) and os.geteuid() != 0:
        raise NeedsRoot(f"{' and '.join(sorted(mounts))} mounted, but this user cannot create "
                        "cgroups (a Slurm job's own cgroup is used under Slurm)")
    raise Missing("; ".join(f"{v}: {_describe(exc)}" for v, exc in failed))


@probe("userns", False, "unprivileged restore in a new pid namespace")
def _userns(scratch: Scratch):
    knobs = ", ".join(f"{k}={v}" for k in ("kernel.unprivileged_userns_clone",
                                             "user.max_user_namespaces")
                      if (v := _sysctl_or_none(k)) is not None)
    as_nobody = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    who = "uid 65534" if as_nobody else f"uid {os.geteuid()}"
    try:
        run = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "true"],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT / 2,
                             **as_nobody)
    except FileNotFoundError:
        raise Missing(f"unshare(1) not found, cannot try ({knobs})") from None
    if run.returncode != 0:
        raise Missing(f"{who} cannot create user+pid namespaces: "
                      f"{run.stderr.strip() or run.returncode} ({knobs})")
    return f"{who} created user+pid namespaces ({knobs})", {}


@probe("yama", False, DUMP)
def _yama(scratch: Scratch):
    scope = _sysctl_or_none("kernel.yama.ptrace_scope")
    meaning = {
        None: (OK, "Yama not active: classic ptrace rules (same uid, or CAP_SYS_PTRACE)"),
        "0": (OK, "ptrace_scope=0: classic ptrace rules (same uid, or CAP_SYS_PTRACE)"),
        "1": (OK, "ptrace_scope=1: without CAP_SYS_PTRACE only descendants can be dumped"),
        "2": (NEEDS_ROOT, "ptrace_scope=2: only CAP_SYS_PTRACE may ptrace (dump needs root)"),
        "3": (MISSING, "ptrace_scope=3: ptrace attach is disabled (no dump possible)"),
    }
    status, text = meaning.get(scope, (MISSING, f"unknown ptrace_scope={scope}"))
    if status == NEEDS_ROOT and not _has_cap(CAP_SYS_PTRACE):
        raise NeedsRoot(text)
    if status == MISSING:
        raise Missing(text)
    return text, {"ptrace_scope": scope}


@probe("nvidia_gpu_checkpoint", False, "dump and restore of GPU processes")
def _nvidia_gpu_checkpoint(scratch: Scratch):
    try:
        driver = gpu.driver(config.load().gpu_library)
    except gpu.DriverError as exc:
        raise Missing(f"{exc}: a job that uses a GPU cannot be checkpointed here") from None
    gpus = driver.devices()
    version = gpu.driver_version()
    listed = "".join(f", {g.model} {g.uuid}" for g in gpus)
    return (f"{driver.library}: driver {version or '(version unknown)'}, CUDA "
            f"{cuda_release(driver.cuda_version)}, checkpoint API present; {len(gpus)} GPUs"
            f"{listed}", {"driver": version, "cuda_version": driver.cuda_version,
                          "gpus": [g.record() for g in gpus]})


# --- report --------------------------------------------------------------------------------


@dataclass
class Report:
    results: list[Result]
    uid: int = field(default_factory=os.geteuid)
    kernel: str = field(default_factory=lambda: " ".join(os.uname()[2::2]))

    def operation(self, op: str) -> tuple[str, list[str]]:
        """("yes" | "needs root" | "no", the required features in the way)."""
        used = [r for r in self.results if r.required and op in r.used_by]
        missing = [r.name for r in used if r.status == MISSING]
        if missing:
            return "no", missing
        root = [r.name for r in used if r.status == NEEDS_ROOT]
        return ("needs root", root) if root else ("yes", [])

    @property
    def ok(self) -> bool:
        return all(r.status == OK for r in self.results if r.required)

    def summary(self) -> str:
        if self.ok:
            return "dump and restore will work here"
        parts = []
        for op, label in ((DUMP, "dump of own processes" if self.uid else "dump"),
                          (RESTORE, "restore")):
            state, names = self.operation(op)
            parts.append(f"{label}: {state}" + (f" ({', '.join(names)})" if names else ""))
        return " / ".join(parts)

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "uid": self.uid,
                "features": [r.as_dict() for r in self.results],
                "verdict": {"ok": self.ok, "dump": self.operation(DUMP)[0],
                            "restore": self.operation(RESTORE)[0], "summary": self.summary()}}

    def render(self, as_json: bool = False) -> str:
        if as_json:
            return json.dumps(self.as_dict(), indent=2)
        width = max(len(r.name) for r in self.results)
        lines = [f"hpccr check: Linux {self.kernel}, uid {self.uid}", "",
                 f"{'FEATURE':<{width}}  {'NEED':<8}  {'STATUS':<10}  DETAIL"]
        for r in self.results:
            need = "required" if r.required else "optional"
            status = r.status.replace("-", " ").upper()
            lines.append(f"{r.name:<{width}}  {need:<8}  {status:<10}  {r.detail}")
        lines += ["", f"verdict: {self.summary()}"]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        missing = [r.name for r in self.results if r.required and r.status == MISSING]
        if missing:
            raise CheckFailed(f"required kernel features missing: {', '.join(missing)} "
                              f"({self.summary()})")
        if not self.ok:
            raise CheckFailed(f"as uid {self.uid}: {self.summary()}")


def run_checks(required_only: bool = False) -> Report:
    """Every probe, or (the prolog's verdict) only those dump and restore cannot do without:
    not the GPU driver's, whose loading may take seconds on a GPU node."""
    return Report([run_probe(p) for p in PROBES if p.required or not required_only])
