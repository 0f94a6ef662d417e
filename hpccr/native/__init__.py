"""Thin Python face of the C layer: ptrace, raw system calls, bulk memory moves (x86_64 Linux).

Every function raises OSError with the real errno; policy lives in the engine.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import struct
from importlib import resources

from hpccr.native._hpccr_native import ffi, lib

PAGE_SIZE = 4096

# ptrace requests and options (linux/ptrace.h)
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE = 1, 2, 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
SIGINFO_SIZE = 128
WALL = 0x40000000

# x86_64 system call numbers used by the engine (asm/unistd_64.h)
SYS = {
    "read": 0, "open": 2, "close": 3, "poll": 7, "mmap": 9, "mprotect": 10, "munmap": 11,
    "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14, "ioctl": 16, "select": 23,
    "mremap": 25, "madvise": 28, "nanosleep": 35, "getitimer": 36, "setitimer": 38,
    "getpid": 39, "exit": 60, "wait4": 61, "fcntl": 72, "chdir": 80, "umask": 95,
    "setgroups": 116, "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123,
    "capget": 125, "capset": 126, "rt_sigtimedwait": 128, "rt_sigqueueinfo": 129,
    "sigaltstack": 131, "personality": 135,
    "prctl": 157, "arch_prctl": 158, "gettid": 186, "futex": 202, "set_tid_address": 218,
    "restart_syscall": 219, "clock_nanosleep": 230, "epoll_wait": 232, "epoll_ctl": 233,
    "openat": 257, "pselect6": 270, "ppoll": 271, "set_robust_list": 273, "get_robust_list": 274,
    "tee": 276, "epoll_pwait": 281, "timerfd_create": 283, "timerfd_settime": 286,
    "timerfd_gettime": 287, "signalfd4": 289, "rt_tgsigqueueinfo": 297, "prlimit64": 302,
    "kcmp": 312, "userfaultfd": 323, "rseq": 334, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "epoll_pwait2": 441, "mount": 165, "unshare": 272, "setpgid": 109,
    "setsid": 112, "exit_group": 231, "setns": 308, "timer_create": 222, "timer_settime": 223,
    "timer_gettime": 224, "timer_getoverrun": 225, "shmget": 29, "shmat": 30, "shmctl": 31,
    "semget": 64, "semctl": 66, "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
    "msgctl": 71, "lseek": 8, "dup3": 292, "mq_open": 240, "mq_unlink": 241,
    "mq_timedsend": 242, "mq_timedreceive": 243, "mq_getsetattr": 245, "mbind": 237,
    "mlock2": 325, "flock": 73, "inotify_init1": 294, "inotify_add_watch": 254,
    "inotify_rm_watch": 255, "open_by_handle_at": 304, "fchdir": 81, "close_range": 436,
}

# KCMP types (linux/kcmp.h)
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 0, 1, 2, 3, 4

REG_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)
XSTATE_MAX = 1 << 16


def _check(ret: int) -> int:
    """C helpers return -errno on failure."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def _ptrace(request: int, tid: int, addr=ffi.NULL, data=ffi.NULL) -> int:
    ffi.errno = 0
    ret = lib.ptrace(request, tid, ffi.cast("void *", addr), ffi.cast("void *", data))
    if ret == -1 and ffi.errno:
        raise OSError(ffi.errno, f"ptrace({request:#x}, {tid}): {os.strerror(ffi.errno)}")
    return ret


def syscall(name: str, *args: int) -> int:
    """Call a system call in this process; returns its value or raises OSError."""
    padded = list(args) + [0] * (6 - len(args))
    ffi.errno = 0
    ret = lib.hpccr_syscall6(SYS[name], *padded)
    if ret == -1 and ffi.errno:
        raise OSError(ffi.errno, f"{name}: {os.strerror(ffi.errno)}")
    return ret


def mount(source: str, target: str, fstype: str, flags: int) -> None:
    """mount(2) without data; an empty `source` or `fstype` is passed as NULL."""
    args = [ffi.new("char[]", s.encode()) if s else ffi.NULL for s in (source, target, fstype)]
    syscall("mount", *(int(ffi.cast("long", a)) for a in args), flags, 0)


def stub_path() -> str:
    """The static restore stub installed inside the package."""
    return str(resources.files("hpccr.native") / "hpccr-stub")


# --- ptrace basics -------------------------------------------------------------------------

def seize(tid: int, options: int = 0) -> None:
    _ptrace(PTRACE_SEIZE, tid, 0, options)


def set_options(tid: int, options: int) -> None:
    _ptrace(PTRACE_SETOPTIONS, tid, 0, options)


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, sig)


def listen(tid: int) -> None:
    """PTRACE_LISTEN: a tracee in group-stop stays stopped, but reports its next change."""
    _ptrace(PTRACE_LISTEN, tid)


def event_message(tid: int) -> int:
    """PTRACE_GETEVENTMSG: at a fork, vfork or clone event stop, the new task's id."""
    msg = ffi.new("unsigned long *")
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, msg)
    return msg[0]


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig)


def wait(tid: int, nohang: bool = False) -> int:
    """waitpid(tid, __WALL); returns the raw status (or -1 with nohang and nothing to report)."""
    ret = lib.hpccr_wait(tid, os.WNOHANG if nohang else 0)
    if nohang and ret == -11:  # -EAGAIN: nothing yet
        return -1
    return _check(ret)


def new_regs():
    return ffi.new("struct user_regs_struct *")


def get_regs(tid: int):
    regs = new_regs()
    _ptrace(PTRACE_GETREGS, tid, 0, regs)
    return regs


def set_regs(tid: int, regs) -> None:
    _ptrace(PTRACE_SETREGS, tid, 0, regs)


def regs_to_dict(regs) -> dict[str, int]:
    return {name: getattr(regs, name) for name in REG_NAMES}


def regs_from_dict(values: dict[str, int]):
    regs = new_regs()
    for name in REG_NAMES:
        setattr(regs, name, values[name] & 0xFFFFFFFFFFFFFFFF)
    return regs


def get_xstate(tid: int) -> bytes:
    buf = ffi.new("char[]", XSTATE_MAX)
    size = ffi.new("size_t *", XSTATE_MAX)
    _check(lib.hpccr_getregset(tid, NT_X86_XSTATE, buf, size))
    return ffi.buffer(buf, size[0])[:]


def set_xstate(tid: int, data: bytes) -> None:
    with ffi.from_buffer(data) as buf:
        _check(lib.hpccr_setregset(tid, NT_X86_XSTATE, buf, len(data)))


def get_sigmask(tid: int) -> int:
    mask = ffi.new("unsigned long long *")
    _ptrace(PTRACE_GETSIGMASK, tid, 8, mask)
    return mask[0]


def set_sigmask(tid: int, value: int) -> None:
    mask = ffi.new("unsigned long long *", value)
    _ptrace(PTRACE_SETSIGMASK, tid, 8, mask)


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """The queued (pending) signals of a thread or of its whole process, without dequeuing."""
    out: list[bytes] = []
    batch = 32
    buf = ffi.new("char[]", SIGINFO_SIZE * batch)
    while True:
        args = ffi.new("unsigned long long[2]")  # u64 off; u32 flags; s32 nr
        ffi.memmove(args, struct.pack("<QIi", len(out), 1 if shared else 0, batch), 16)
        n = _ptrace(PTRACE_PEEKSIGINFO, tid, args, buf)
        out += [ffi.buffer(buf + i * SIGINFO_SIZE, SIGINFO_SIZE)[:] for i in range(n)]
        if n < batch:
            return out


def rseq_config(tid: int) -> dict[str, int] | None:
    buf = ffi.new("char[32]")
    _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 32, buf)
    ptr, size, sig, _flags, _pad = struct.unpack("<QIIII", ffi.buffer(buf, 24)[:])
    return {"ptr": ptr, "len": size, "sig": sig} if ptr else None


def inject(tid: int, ip: int, base, name: str, *args: int) -> int:
    """Run system call `name` inside stopped thread `tid` (see hpccr_inject); returns its value."""
    padded = list(args) + [0] * (6 - len(args))
    ret = ffi.new("long *")
    _check(lib.hpccr_inject(tid, ip, base, SYS[name], *padded, ret))
    return ret[0]


def inject_to_exit(tid: int, ip: int, base, name: str, *args: int) -> int:
    """Run system call `name` inside stopped thread `tid` and leave it stopped at the call's exit
    (see hpccr_inject_to_exit); returns its value."""
    padded = list(args) + [0] * (6 - len(args))
    ret = ffi.new("long *")
    _check(lib.hpccr_inject_to_exit(tid, ip, base, SYS[name], *padded, ret))
    return ret[0]


def next_syscall_exit(tid: int) -> int:
    """Let a thread stopped at a syscall exit run to the exit of its next system call (see
    hpccr_next_syscall_exit); returns that call's value."""
    ret = ffi.new("long *")
    _check(lib.hpccr_next_syscall_exit(tid, ret))
    return ret[0]


# --- memory ----------------------------------------------------------------------------------

def read_ranges(pid: int, addrs, lens, count: int, buf) -> int:
    """process_vm_readv of `count` ranges (uint64 arrays from ffi/numpy) into `buf`."""
    with ffi.from_buffer(buf, require_writable=True) as ptr:
        return _check(lib.hpccr_read_ranges(pid, addrs, lens, count, ptr))


def write_ranges(pid: int, addrs, lens, count: int, buf, offsets=ffi.NULL) -> int:
    """process_vm_writev of `count` ranges from `buf`: back to back, or each at its offset in
    `offsets` (a uint64 array) if given."""
    with ffi.from_buffer(buf) as ptr:
        return _check(lib.hpccr_write_ranges(pid, addrs, lens, offsets, count, ptr))


def place_ranges(uffd: int, pid: int, addrs, lens, count: int, buf, offsets=ffi.NULL) -> int:
    """write_ranges into the memory of userfaultfd `uffd` by UFFDIO_COPY (hpccr_place_ranges)."""
    with ffi.from_buffer(buf) as ptr:
        return _check(lib.hpccr_place_ranges(uffd, pid, addrs, lens, offsets, count, ptr))


def uffd_fill(uffd: int, dst: int, src, length: int) -> tuple[int, int]:
    """hpccr_uffd_fill from buffer `src` (None: zero pages); returns (0 or -errno, bytes done)."""
    done = ffi.new("unsigned long long *")
    if src is None:
        return lib.hpccr_uffd_fill(uffd, dst, ffi.NULL, length, done), done[0]
    with ffi.from_buffer(src) as ptr:
        return lib.hpccr_uffd_fill(uffd, dst, ptr, length, done), done[0]


def _flat(pairs: list[tuple[int, int]]) -> array.array:
    return array.array("Q", [value for pair in pairs for value in pair])


def _pairs(flat: array.array, n: int) -> list[tuple[int, int]]:
    return list(zip(flat[0:2 * n:2], flat[1:2 * n:2], strict=True))


def spans_op(name: str, a: list[tuple[int, int]], b: list[tuple[int, int]]):
    """hpccr_spans_`name` (intersect, subtract) of two lists of sorted, disjoint spans."""
    flat_a, flat_b = _flat(a), _flat(b)
    out = array.array("Q", [0]) * (2 * (len(a) + len(b) + 1))
    with ffi.from_buffer("uint64_t[]", flat_a) as pa, ffi.from_buffer("uint64_t[]", flat_b) as pb, \
            ffi.from_buffer("uint64_t[]", out, require_writable=True) as po:
        n = getattr(lib, f"hpccr_spans_{name}")(pa, len(a), pb, len(b), po)
    return _pairs(out, n)


def spans_inherit(spans, covered, written, held):
    """hpccr_spans_inherit: (the spans left to the parent, the (start, length) of the others)."""
    flat = [_flat(spans), _flat(covered), _flat(written), _flat(held)]
    room = 2 * (len(spans) + len(covered) + len(written) + len(held) + 1)
    inherited, saved = array.array("Q", [0]) * room, array.array("Q", [0]) * room
    nsaved = ffi.new("size_t *")
    with contextlib.ExitStack() as stack:
        ps, pc, pw, ph, pi, po = (stack.enter_context(ffi.from_buffer("uint64_t[]", each))
                                  for each in (*flat, inherited, saved))
        n = lib.hpccr_spans_inherit(ps, len(spans), pc, len(covered), pw, len(written), ph,
                                    len(held), pi, po, nsaved)
    if n < 0:
        raise MemoryError("hpccr_spans_inherit")
    return _pairs(inherited, n), _pairs(saved, nsaved[0])


def read_mem(pid: int, addr: int, size: int) -> bytes:
    buf = bytearray(size)
    a = ffi.new("unsigned long long[1]", [addr])
    n = ffi.new("unsigned long long[1]", [size])
    read_ranges(pid, a, n, 1, buf)
    return bytes(buf)


def write_mem(pid: int, addr: int, data: bytes) -> None:
    a = ffi.new("unsigned long long[1]", [addr])
    n = ffi.new("unsigned long long[1]", [len(data)])
    write_ranges(pid, a, n, 1, data)


def pagemap_runs(entries, any_bits: int, no_bits: int) -> list[tuple[int, int]]:
    """Runs (first page index, page count) of pagemap entries with a bit of `any_bits` set and
    none of `no_bits`."""
    with ffi.from_buffer("unsigned long long[]", entries) as src:
        return _runs(len(entries) // 8, lambda n, starts, counts, room: lib.hpccr_pagemap_runs(
            src, n, any_bits, no_bits, starts, counts, room))


def pagemap_same(mine, theirs) -> list[tuple[int, int]]:
    """Runs (first page index, page count) where two pagemaps of the same addresses name the
    same page: the same frame (present) or swap slot (swapped), not a file page."""
    with ffi.from_buffer("unsigned long long[]", mine) as a, \
            ffi.from_buffer("unsigned long long[]", theirs) as b:
        return _runs(min(len(mine), len(theirs)) // 8,
                     lambda n, starts, counts, room: lib.hpccr_pagemap_same(
                         a, b, n, starts, counts, room))


def _runs(n: int, collect) -> list[tuple[int, int]]:
    """The (first page index, page count) runs that collect(n, starts, counts, room) writes
    for n pagemap entries (at most one run per two entries, rounded up)."""
    if n == 0:
        return []
    room = n // 2 + 1
    starts = ffi.new("unsigned long long[]", room)
    counts = ffi.new("unsigned long long[]", room)
    runs = collect(n, starts, counts, room)
    return [(starts[i], counts[i]) for i in range(runs)]


# --- processes -------------------------------------------------------------------------------

def fork_with_pid(pid: int, flags: int = 0) -> int:
    """fork() whose child gets exactly `pid` (clone3 set_tid) and the clone `flags` (e.g.
    CLONE_FS); returns 0 in the child."""
    ffi.errno = 0
    ret = lib.hpccr_fork_with_pid(pid, flags)
    if ret < 0:
        raise OSError(ffi.errno, f"clone3(set_tid={pid}): {os.strerror(ffi.errno)}")
    return ret


def statfs_type(path: str) -> int:
    return _check(lib.hpccr_statfs_type(path.encode()))


PIDFD_THREAD = os.O_EXCL  # linux/pidfd.h


def pidfd_open(tid: int) -> int:
    """A pidfd of `tid`: of its process, or of the thread itself (PIDFD_THREAD) for a thread
    that does not lead its group (whose main thread has exited)."""
    try:
        return os.pidfd_open(tid)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # as kernels say "not a leader"
            raise
        return os.pidfd_open(tid, PIDFD_THREAD)


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    """0 if the two resources are the same kernel object (kcmp(2) ordering otherwise)."""
    return syscall("kcmp", pid1, pid2, kind, idx1, idx2)


def robust_list(tid: int) -> tuple[int, int]:
    head = ffi.new("unsigned long *")
    size = ffi.new("size_t *")
    syscall("get_robust_list", tid, int(ffi.cast("long", head)), int(ffi.cast("long", size)))
    return head[0], size[0]
