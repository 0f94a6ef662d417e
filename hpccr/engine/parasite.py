"""System calls run inside a live process (the dump side) so that it survives hpccr's death.

When a tracer dies, the kernel detaches its tracees and they resume with the registers they hold
at that moment.  The restore side's `syscall; int3` would then kill them (SIGTRAP, or a fault at
an instruction pointer left in a scratch area).  Here every thread that runs injected calls
instead resumes at the `syscall` of this trampoline, and whatever it runs next by itself
returns it to its own state:

    syscall                              the injected call
    rt_sigprocmask(SIG_SETMASK, mask)    its own signal mask back
    pop r15 ... rdi; popfq               its registers and flags back
    jmp *tail                            to the thread's tail: pop rsp; jmp *saved_rip

The registers, mask and tail address (the "block") are written on the thread's own stack, below
its red zone, where a signal frame would go.  hpccr resumes injected threads with PTRACE_SYSCALL
and takes them back at the call's exit stop (PTRACE_O_TRACESYSGOOD, so that a detach there sends
no SIGTRAP); they never run the rest unless hpccr is gone.  All signals are blocked only while a
thread's registers point at the trampoline, which unblocks them again.

The trampoline first lives in the zero padding at the end of the [vdso], which the process
never executes: from there the leader maps the scratch area (data, and tails for the other
threads) and, at close(), unmaps it again.  The padding is zeroed again when all threads are
back.  A process without such padding (no vdso) is not dumped.  If hpccr dies while the scratch
area is mapped, the area (16 pages, unused) stays in the process until the next dump, which
leaves it out of the image and unmaps it (without_scratch_left).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct

from hpccr import faults, native
from hpccr.engine import cpu, procfs
from hpccr.engine.tracer import ALL_SIGNALS, Injector, Thread, copy_fd, poke
from hpccr.errors import UnsupportedResource

TRAMPOLINE = bytes.fromhex(
    "0f05"                          # syscall
    "b80e000000"                    # mov $14, %eax (rt_sigprocmask)
    "bf02000000"                    # mov $2, %edi (SIG_SETMASK)
    "488db42488000000"              # lea 136(%rsp), %rsi (the block's mask)
    "31d2"                          # xor %edx, %edx
    "41ba08000000"                  # mov $8, %r10d
    "0f05"                          # syscall
    "415f415e415d415c5d5b415b415a4159415858595a5e5f"  # pop r15 r14 r13 r12 rbp rbx r11 r10 r9
                                                      #     r8 rax rcx rdx rsi rdi
    "9d"                            # popfq
    "ff642410"                      # jmp *16(%rsp) (the block's tail address)
)
# Entry of take_fd(): the call makes a descriptor, the trampoline's first call closes it again.
TAKE_FD = bytes.fromhex(
    "0f05"                          # syscall
    "89c7"                          # mov %eax, %edi
    "b803000000"                    # mov $3, %eax (close), then into TRAMPOLINE
)
# Marks a scratch area whose code hpccr did not get to write (see without_scratch_left).
SCRATCH_MARK = b"\xcc\xcchpccr\xcc"
# Entry of the scratch area's mmap: the area is marked at once, by the process itself if hpccr
# is gone, so that no unmarked area is ever left behind.
MAP_SCRATCH = bytes.fromhex(
    "0f05"                          # syscall
    "483d00f0ffff"                  # cmp $-4096, %rax
    "770d"                          # ja 1f (an error: nothing to mark)
    "48ba") + SCRATCH_MARK + bytes.fromhex(  # movabs $SCRATCH_MARK, %rdx
    "488910"                        # mov %rdx, (%rax)
    "eb0b"                          # 1: jmp past TAKE_FD and TRAMPOLINE's syscall
)
# Its entries: MAP_SCRATCH at 0, TAKE_FD after it, and every other call at CALL.
CODE = MAP_SCRATCH + TAKE_FD + TRAMPOLINE
CALL = len(MAP_SCRATCH) + len(TAKE_FD)
TAIL = bytes.fromhex("5c" "ff2500000000")  # pop %rsp; jmp *0(%rip), then the saved rip
TAIL_SIZE = 16
BLOCK_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
              "rdx", "rsi", "rdi", "eflags", "rsp")
BLOCK_SIZE = 8 * len(BLOCK_REGS) + 16  # + mask, tail address
RED_ZONE = 128
BOOT_SIZE = len(CODE) + TAIL_SIZE  # the code and the leader's tail
MASK64 = (1 << 64) - 1


def vdso_padding(pid: int) -> int | None:
    """Address of BOOT_SIZE zero bytes at the end of the process's [vdso], past everything its
    ELF image holds (sections and their headers), or None.  They may hold the trampoline of an
    hpccr killed before it wiped it."""
    for entry in procfs.maps(pid):
        if entry.name == "[vdso]":
            start, end = entry.start, entry.end
            break
    else:
        return None
    image = native.read_mem(pid, start, end - start)
    if image[:4] != b"\x7fELF":
        return None
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    used = shoff + shentsize * shnum
    for i in range(shnum):
        sh_type, = struct.unpack_from("<I", image, shoff + i * shentsize + 4)
        offset, size = struct.unpack_from("<QQ", image, shoff + i * shentsize + 0x18)
        if sh_type != 8:  # SHT_NOBITS takes no room in the image
            used = max(used, offset + size)
    addr = (start + used + 15) & ~15
    if addr + BOOT_SIZE > end:
        return None
    found = image[addr - start:addr - start + BOOT_SIZE]
    if any(found) and not found.startswith(CODE):  # not zeros, nor left by a killed hpccr
        return None
    return addr


def without_scratch_left(pid: int, entries: list) -> tuple[list, list[int]]:
    """`entries` (procfs.maps) less the scratch areas an hpccr killed meanwhile left in the
    process (anonymous, rwx, starting with CODE; possibly merged with a neighbour), and the
    addresses of those areas, for the next LiveInjector to unmap."""
    kept, left = [], []
    for entry in entries:
        while (entry.perms == "rwxp" and not entry.name
               and entry.end - entry.start >= LiveInjector.SIZE
               and _is_scratch(native.read_mem(pid, entry.start, len(CODE)))):
            left.append(entry.start)
            entry = dataclasses.replace(entry, start=entry.start + LiveInjector.SIZE)
        if entry.end > entry.start:
            kept.append(entry)
    return kept, left


def _is_scratch(start: bytes) -> bool:
    return start == CODE or start.startswith(SCRATCH_MARK)


class LiveInjector(Injector):
    """Injector for a live process (see the module's docstring): same calls and scratch data,
    a process that resumes by itself at any moment hpccr disappears."""

    SIZE = 16 * native.PAGE_SIZE  # the scratch area: code page, then data

    def __init__(self, pid: int, leader: Thread, left_behind: list[int] = ()):
        """`left_behind`: scratch areas of killed hpccrs (without_scratch_left) to unmap."""
        self.pid = pid
        self.leader = leader
        self.size = self.SIZE
        self.left_behind = list(left_behind)
        self.base = 0
        self._cursor = 0
        self._inside: dict[int, Thread] = {}  # threads whose registers point at a trampoline
        self._tails = 0
        self._boot = vdso_padding(pid)
        if self._boot is None:
            raise UnsupportedResource(f"process {pid} has no [vdso] with room for hpccr's "
                                      "injected code")
        poke(pid, self._boot, CODE)  # the vdso is read-only: through /proc/PID/mem
        prot = 0x7  # PROT_READ | PROT_WRITE | PROT_EXEC
        flags = 0x22  # MAP_PRIVATE | MAP_ANONYMOUS
        try:
            self.base = self._run(self.leader, 0, "mmap", 0, self.size, prot, flags, -1, 0)
            native.write_mem(pid, self.base, CODE)
        except BaseException:
            self.close()
            raise
        self.reset()

    def _enter(self, thread: Thread) -> None:
        """Point `thread` at a trampoline that returns it to where it stopped, then block its
        signals (in that order: the trampoline unblocks them)."""
        resume = _resume_regs(thread.regs)
        if thread is self.leader:
            tail = self._boot + len(CODE)
        else:
            self._tails += 1
            tail = self.base + len(CODE) + self._tails * TAIL_SIZE
            if tail + TAIL_SIZE > self.base + self.CODE_SIZE:
                raise OSError(errno.ENOMEM, "no room for another thread's tail")
        poke(self.pid, tail, TAIL + struct.pack("<Q", resume.rip))
        block = (resume.rsp - RED_ZONE - BLOCK_SIZE) & ~15
        values = [getattr(resume, name) & MASK64 for name in BLOCK_REGS]
        native.write_mem(self.pid, block,
                         struct.pack(f"<{len(values) + 2}Q", *values, thread.sigmask, tail))
        thread.resume = resume
        thread.injected = native.new_regs()
        native.ffi.memmove(thread.injected, resume, native.ffi.sizeof("struct user_regs_struct"))
        thread.injected.rsp = block
        # Until its first call, a harmless one: getpid
        thread.injected.rip = self._code(thread) + CALL
        thread.injected.rax = native.SYS["getpid"]
        native.set_regs(thread.tid, thread.injected)
        self._inside[thread.tid] = thread
        faults.point("enter")
        native.set_sigmask(thread.tid, ALL_SIGNALS)

    def _code(self, thread: Thread) -> int:
        """Where `thread` finds CODE: the leader in the vdso, which outlives the scratch area."""
        return self._boot if thread is self.leader else self.base

    def call(self, name: str, *args: int, thread: Thread | None = None) -> int:
        """Run system call `name` in `thread` (default: the leader); raise OSError on -errno."""
        return self._run(thread or self.leader, CALL, name, *args)

    def _run(self, thread: Thread, entry: int, name: str, *args: int) -> int:
        """Run `name` from `entry` (an offset in CODE) in `thread`, left at its exit stop."""
        if thread.tid not in self._inside:
            self._enter(thread)
        ret = native.inject_to_exit(thread.tid, self._code(thread) + entry, thread.injected,
                                    name, *args)
        faults.point("inject")
        return _checked(name, thread, ret)

    def take_fd(self, name: str, *args: int) -> int:
        """Run `name`, a call that makes a descriptor, in the leader and return a copy of that
        descriptor in hpccr.  The process's own is closed by the trampoline's next call, which
        it makes by itself if hpccr dies first: no descriptor is ever left behind."""
        thread = self.leader
        if thread.tid not in self._inside:
            self._enter(thread)
        remote = native.inject_to_exit(thread.tid, self._code(thread) + len(MAP_SCRATCH),
                                       thread.injected, name, *args)
        faults.point("take_fd")
        try:
            _checked(name, thread, remote)
            return copy_fd(self.pid, remote)
        finally:
            native.next_syscall_exit(thread.tid)  # the close

    def close(self) -> None:
        """Put every thread back as it was, unmapping the scratch area on the way, and wipe the
        trampoline from the vdso.  Threads using the scratch area go back before it goes."""
        for thread in [t for t in self._inside.values() if t is not self.leader]:
            self._leave(thread)
        while self.left_behind:
            self.call("munmap", self.left_behind.pop(), self.SIZE)
        if self.base:
            self.call("munmap", self.base, self.size)
            self.base = 0
            faults.point("unmap")
        if self.leader.tid in self._inside:
            self._leave(self.leader)
        if self._boot is not None:
            poke(self.pid, self._boot, bytes(BOOT_SIZE))
            self._boot = None

    def _leave(self, thread: Thread) -> None:
        thread.settle()
        del self._inside[thread.tid]


def _resume_regs(regs):
    """The registers a thread stopped by the freeze resumes with by itself, its interrupted
    system call (if any) set up to be issued again as the kernel would have done.  Its restart
    block is still there, so ERESTART_RESTARTBLOCK becomes restart_syscall (unlike a restore,
    see cpu.resume_regs)."""
    out = native.new_regs()
    native.ffi.memmove(out, regs, native.ffi.sizeof("struct user_regs_struct"))
    if regs.orig_rax != cpu.NOT_IN_SYSCALL:
        error = (1 << 64) - regs.rax
        if error in (cpu.ERESTARTSYS, cpu.ERESTARTNOINTR, cpu.ERESTARTNOHAND):
            out.rax = regs.orig_rax
            out.rip = regs.rip - 2  # back onto the 2-byte `syscall` instruction
        elif error == cpu.ERESTART_RESTARTBLOCK:
            out.rax = native.SYS["restart_syscall"]
            out.rip = regs.rip - 2
    out.orig_rax = cpu.NOT_IN_SYSCALL
    return out


def _checked(name: str, thread: Thread, ret: int) -> int:
    if -4096 < ret < 0:
        raise OSError(-ret, f"{name} in {thread.tid}: {os.strerror(-ret)}")
    return ret
