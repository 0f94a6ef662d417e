"""Freezing a process under ptrace, and running system calls inside it (the "parasite").

Nothing here knows about images: the dump and restore drivers use these two tools.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from hpccr import faults, native
from hpccr.engine import procfs
from hpccr.errors import AccessDenied, Busy, DumpFailed, NoSuchProcess

ALL_SIGNALS = (1 << 64) - 1
WALL = 0x40000000
SYSCALL_INT3 = b"\x0f\x05\xcc"  # syscall; int3


def _is_event_stop(status: int) -> bool:
    return os.WIFSTOPPED(status) and (status >> 16) == native.PTRACE_EVENT_STOP


class Thread:
    """One thread stopped under ptrace, with the registers and mask it had when it stopped."""

    def __init__(self, tid: int):
        self.tid = tid
        self.regs = None
        self.sigmask = 0
        self.regs_changed = False
        # While a LiveInjector runs calls in it: the registers it resumes with, and those its
        # injected calls start from.
        self.resume = None
        self.injected = None

    def capture(self) -> None:
        self.regs = native.get_regs(self.tid)
        self.sigmask = native.get_sigmask(self.tid)

    def settle(self) -> None:
        """Give a thread that ran a LiveInjector's calls its own mask, then its own registers
        (in that order: until the second, its trampoline would restore the mask too)."""
        native.set_sigmask(self.tid, self.sigmask)
        faults.point("settle")
        native.set_regs(self.tid, self.resume)
        self.resume = self.injected = None


class FrozenProcess:
    """All threads of `pid` seized and stopped; thaw() or kill() releases them.

    A process that was stopped (SIGSTOP, a suspended Slurm job) reports every trap with its
    stop signal instead of SIGTRAP (`stopped`); once detached, the kernel stops it again."""

    def __init__(self, pid: int):
        self.pid = pid
        self.threads: dict[int, Thread] = {}
        self.stopped = False
        # The main thread has exited while the others run on (pthread_exit in main): it cannot
        # be traced, and its /proc entries no longer show the memory, descriptors and cwd.
        self.main_thread_exited = False

    @property
    def reader(self) -> int:
        """The task whose /proc entries and memory show the process: the process itself, or a
        thread that still runs once the main thread has exited."""
        return self.pid if self.pid in self.threads else next(iter(self.threads))

    def freeze(self) -> None:
        try:
            self.main_thread_exited = procfs.leader_exited(self.pid)
            self._seize_all()
            for thread in self.threads.values():
                thread.capture()
        except OSError as exc:
            self.thaw()
            if exc.errno == errno.ESRCH:
                raise NoSuchProcess(f"process {self.pid} exited while being frozen") from None
            if exc.errno == errno.EPERM:
                tracer = self._tracer()
                if tracer:
                    raise Busy(f"process {self.pid} is traced by {tracer}: a debugger, or "
                               "another hpccr checkpointing it; it runs on untouched") from None
                raise AccessDenied(f"cannot ptrace process {self.pid}: "
                                   "operation not permitted") from None
            raise DumpFailed(f"freezing process {self.pid}: {exc.strerror}") from None

    def _tracer(self) -> str:
        """Who traces one of the process's threads ("process N (comm)"), or "": nobody."""
        for tid in procfs.tids(self.pid):
            with contextlib.suppress(OSError, KeyError, ValueError):
                tracer = int(procfs.status(self.pid, tid)["TracerPid"])
                if tracer:
                    name = ""
                    with contextlib.suppress(OSError):
                        name = f" ({procfs.comm(tracer)})"
                    return f"process {tracer}{name}"
        return ""

    def _seize_all(self) -> None:
        while True:
            new = [t for t in procfs.tids(self.pid) if t not in self.threads
                   and not (t == self.pid and self.main_thread_exited)]
            if not new:
                return
            for tid in new:
                try:
                    # TRACESYSGOOD: see parasite.py
                    native.seize(tid, native.PTRACE_O_TRACESYSGOOD)
                except OSError as exc:
                    if tid != self.pid and (exc.errno == errno.ESRCH or (
                            exc.errno == errno.EPERM and self._ended(tid))):
                        continue  # that thread exited meanwhile (exited, not yet reaped: EPERM)
                    raise
                self.threads[tid] = Thread(tid)
                if not self._stop(tid):
                    del self.threads[tid]  # a thread that ended before it stopped
                    continue
                faults.point("freeze")

    def _ended(self, tid: int) -> bool:
        """Thread `tid` has exited: gone, or a zombie thread waiting to be reaped (which
        ptrace refuses to seize with EPERM)."""
        return procfs.state(self.pid, tid) in (None, "Z", "X")

    def _stop(self, tid: int) -> bool:
        """Stop the seized thread `tid`; False if it exited first (a thread of a process that
        creates and ends threads all the time), which only the main thread may not."""
        try:
            native.interrupt(tid)
        except OSError as exc:
            if exc.errno != errno.ESRCH or tid == self.pid:
                raise
            with contextlib.suppress(OSError):  # dead and ours to reap, as our tracee
                native.wait(tid)
            return False
        try:
            self._wait_stopped(tid)
        except OSError as exc:  # reaped by that wait: its tid may be anyone's now
            if exc.errno != errno.ESRCH or tid == self.pid:
                raise
            return False
        return True

    def _wait_stopped(self, tid: int) -> None:
        retrapped = False
        while True:
            status = native.wait(tid)
            if _is_event_stop(status) and os.WSTOPSIG(status) == signal.SIGTRAP:
                return
            if _is_event_stop(status):
                # Stopped: the first trap may be the one a stopped task takes when seized,
                # with our interrupt still to come, which would stop the first injected call.
                # One more interrupt, taken at once, leaves none pending.
                if retrapped:
                    self.stopped = True
                    return
                retrapped = True
                native.interrupt(tid)
                native.cont(tid, 0)
                continue
            if os.WIFSTOPPED(status):
                # A signal-delivery stop came first: deliver it as the kernel would have (the
                # handler frame is then part of the saved state), and let the interrupt land.
                native.interrupt(tid)
                native.cont(tid, os.WSTOPSIG(status))
                continue
            raise OSError(errno.ESRCH, "thread exited")

    def tids(self) -> list[int]:
        return list(self.threads)

    def thaw(self) -> None:
        """Put back registers and masks and detach every thread; best effort on exit races.
        A process that was stopped stops again once detached, and is back in its stop when
        this returns."""
        for thread in self.threads.values():
            try:
                if thread.resume is not None:
                    thread.settle()
                elif thread.regs_changed:
                    native.set_regs(thread.tid, thread.regs)
                native.detach(thread.tid, 0)
            except OSError:
                pass
            faults.point("thaw")
        if self.stopped:
            wait_stopped_again(self.pid, list(self.threads))
        self.threads.clear()

    def reap(self, child: int) -> None:
        """Make the process reap its (dead) child, as it would have: when a whole tree is
        killed, children go first and nothing is left for an init that may not reap."""
        try:
            call_once(self.reader, self.threads[self.reader], "wait4", child, 0, WALL, 0)
        except OSError:
            pass  # not its child after all: its reaper will see to it

    def kill(self) -> None:
        """SIGKILL the process and reap it as its tracer: other threads before the leader."""
        os.kill(self.pid, signal.SIGKILL)
        order = sorted(self.threads, key=lambda tid: tid == self.pid)
        for tid in order:
            while True:
                try:
                    status = native.wait(tid)
                except OSError:
                    break
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    break
                try:
                    native.cont(tid, 0)
                except OSError:
                    pass
        self.threads.clear()


def wait_stopped_again(pid: int, tids: list[int], timeout: float = 10) -> None:
    """Wait until the threads of a stopped process, just detached, are in their group stop
    again.  Detaching wakes each one only for it to stop in the kernel, before a single
    instruction of its own; meanwhile /proc shows it running, and so would a parent that
    looks.  Gives up (the stop is then the kernel's business) after `timeout` seconds, or
    when a thread is seen neither stopped nor runnable: SIGCONT came meanwhile."""
    deadline = time.monotonic() + timeout
    pending = list(tids)
    while pending and time.monotonic() < deadline:
        pending = [t for t in pending if procfs.state(pid, t) in ("R", "D")]
        if pending:
            time.sleep(0.001)


def poke(pid: int, addr: int, code: bytes) -> bytes:
    """Write `code` over the target's memory at `addr` (even read-only text, as a debugger
    does); returns the bytes it replaced."""
    with open(procfs.path(pid, "mem"), "r+b", buffering=0) as mem:
        mem.seek(addr)
        original = mem.read(len(code))
        mem.seek(addr)
        mem.write(code)
    return original


def call_once(pid: int, thread: Thread, name: str, *args: int) -> int:
    """One system call in a stopped thread, without a scratch area: through a `syscall; int3`
    pair poked over its current instruction and put back at once."""
    ip = thread.regs.rip
    original = poke(pid, ip, SYSCALL_INT3)
    try:
        thread.regs_changed = True
        return native.inject(thread.tid, ip, thread.regs, name, *args)
    finally:
        poke(pid, ip, original)


def copy_fd(pid: int, fd: int) -> int:
    """A copy in hpccr of descriptor `fd` of process `pid` (pidfd_getfd)."""
    pidfd = os.pidfd_open(pid)
    try:
        return native.syscall("pidfd_getfd", pidfd, fd, 0)
    finally:
        os.close(pidfd)


class Injector:
    """Runs system calls inside a stopped process through a scratch area mapped into it.

    The first call goes through a `syscall; int3` pair at `bootstrap_ip` (the stub's entry on
    restore, or bytes poked over the leader's current instruction on dump and put back at once).
    That call maps the scratch area: one code page with the pair, then data pages for arguments.
    """

    CODE_SIZE = native.PAGE_SIZE

    def __init__(self, pid: int, leader: Thread, data_pages: int = 15, at: int | None = None,
                 bootstrap_ip: int | None = None):
        self.pid = pid
        self.leader = leader
        self.size = self.CODE_SIZE + data_pages * native.PAGE_SIZE
        self.base = 0
        self._cursor = 0
        self._poked: tuple[int, bytes] | None = None
        self.ip = bootstrap_ip if bootstrap_ip is not None else self._poke(leader.regs.rip)
        prot = 0x7  # PROT_READ | PROT_WRITE | PROT_EXEC
        flags = 0x22  # MAP_PRIVATE | MAP_ANONYMOUS
        if at is not None:
            flags |= 0x100000  # MAP_FIXED_NOREPLACE
        try:
            self.base = self.call("mmap", at or 0, self.size, prot, flags, -1, 0)
        finally:
            self._unpoke()
        if at is not None and self.base != at:
            raise OSError(errno.EEXIST, f"scratch area not placed at {at:#x}")
        native.write_mem(pid, self.base, SYSCALL_INT3)
        self.ip = self.base
        self.reset()

    @classmethod
    def adopt(cls, pid: int, leader: Thread, base: int, size: int) -> Injector:
        """An injector over a scratch area already mapped in `pid` (its code page first): a
        forked child's copy of its parent's (engine/forked.py).  Never closed: the child's own
        rebuild unmaps it."""
        inj = cls.__new__(cls)
        inj.pid, inj.leader, inj.size, inj.base, inj.ip = pid, leader, size, base, base
        inj._poked = None
        inj.reset()
        return inj

    def _poke(self, ip: int) -> int:
        self._poked = (ip, poke(self.pid, ip, SYSCALL_INT3))
        return ip

    def _unpoke(self) -> None:
        if self._poked:
            poke(self.pid, *self._poked)
            self._poked = None

    def call(self, name: str, *args: int, thread: Thread | None = None) -> int:
        """Run system call `name` in `thread` (default: the leader); raise OSError on -errno."""
        thread = thread or self.leader
        thread.regs_changed = True
        ret = native.inject(thread.tid, self.ip, thread.regs, name, *args)
        if -4096 < ret < 0:
            raise OSError(-ret, f"{name} in {thread.tid}: {os.strerror(-ret)}")
        return ret

    def take_fd(self, name: str, *args: int) -> int:
        """Run `name`, a call that makes a descriptor, in the leader and return a copy of that
        descriptor in hpccr; the target's own is closed."""
        remote = self.call(name, *args)
        try:
            return copy_fd(self.pid, remote)
        finally:
            self.call("close", remote)

    # Scratch data: a bump allocator over the data pages, reset between unrelated calls.
    def reset(self) -> None:
        self._cursor = self.base + self.CODE_SIZE

    def put(self, data: bytes) -> int:
        """Copy `data` into the scratch data area; returns its address in the target."""
        addr = (self._cursor + 15) & ~15
        if addr + max(len(data), 1) > self.base + self.size:
            raise OSError(errno.ENOMEM, "scratch area full")
        if data:
            native.write_mem(self.pid, addr, data)
        self._cursor = addr + max(len(data), 1)
        return addr

    def alloc(self, size: int) -> int:
        return self.put(bytes(size))

    def get(self, addr: int, size: int) -> bytes:
        return native.read_mem(self.pid, addr, size)

    def code_at(self, offset: int, code: bytes) -> int:
        """Place extra instructions in the code page (after the syscall pair); returns address."""
        native.write_mem(self.pid, self.base + offset, code)
        return self.base + offset

    def close(self, code_ip: int | None = None) -> None:
        """Unmap the scratch area.  The munmap cannot run from the area it removes, so it goes
        through a pair poked over `code_ip` (default: the leader's instruction pointer)."""
        if not self.base:
            return
        self.ip = self._poke(code_ip if code_ip is not None else self.leader.regs.rip)
        try:
            self.call("munmap", self.base, self.size)
        finally:
            self._unpoke()
            self.base = 0
