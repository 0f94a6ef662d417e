"""Per-thread kernel state that is not registers or signals: the tid address cleared on exit,
the robust futex list, rseq registration, the name, and (process-wide) AMX permission."""

from __future__ import annotations

import struct

from hpccr import native
from hpccr.engine import procfs

PR_SET_NAME, PR_GET_TID_ADDRESS = 15, 40
ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1022, 0x1023
XFEATURE_XTILEDATA = 18
RSEQ_FLAG_UNREGISTER = 1

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
CLONE_ARGS = struct.Struct("<11Q")


def dump_thread(inj, pid: int, thread) -> dict:
    area = inj.alloc(8)
    inj.call("prctl", PR_GET_TID_ADDRESS, area, 0, 0, 0, thread=thread)
    clear_child_tid = struct.unpack("<Q", inj.get(area, 8))[0]
    inj.reset()
    head, size = native.robust_list(thread.tid)
    return {"tid": thread.tid, "comm": procfs.comm(pid, thread.tid),
            "clear_child_tid": clear_child_tid, "robust_list": [head, size],
            "rseq": native.rseq_config(thread.tid)}


def dump_xcomp_perm(inj) -> int:
    area = inj.alloc(8)
    inj.call("arch_prctl", ARCH_GET_XCOMP_PERM, area)
    perm = struct.unpack("<Q", inj.get(area, 8))[0]
    inj.reset()
    return perm


def restore_xcomp_perm(inj, perm: int) -> None:
    if perm & (1 << XFEATURE_XTILEDATA):
        inj.call("arch_prctl", ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)


def create_thread(inj, tid: int) -> int:
    """clone3 a thread with exactly `tid` (in the process's own pid namespace) inside the
    leader; returns its tid as seen here.  The new thread starts traced and stopped
    (PTRACE_O_TRACECLONE) on the instruction after the injected syscall."""
    before = set(procfs.tids(inj.pid))
    tid_ptr = inj.put(struct.pack("<i", tid))
    args = inj.put(CLONE_ARGS.pack(THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, tid_ptr, 1, 0))
    inner = inj.call("clone3", args, CLONE_ARGS.size)
    inj.reset()
    if inner != tid:
        raise OSError(17, f"thread got tid {inner} instead of {tid}")
    (outer,) = set(procfs.tids(inj.pid)) - before
    while True:
        status = native.wait(outer)
        if (status >> 8) & 0xFF:  # stopped: the initial SIGSTOP of an auto-attached thread
            return outer


def restore_thread(inj, thread, saved: dict) -> None:
    inj.call("set_tid_address", saved["clear_child_tid"], thread=thread)
    head, size = saved["robust_list"]
    if head:
        inj.call("set_robust_list", head, size, thread=thread)
    rseq = saved["rseq"]
    if rseq:
        inj.call("rseq", rseq["ptr"], rseq["len"], 0, rseq["sig"], thread=thread)
    set_name(inj, thread, saved["comm"])


def set_name(inj, thread, comm: str) -> None:
    name = inj.put(comm.encode()[:15] + b"\0")
    inj.call("prctl", PR_SET_NAME, name, 0, 0, 0, thread=thread)
    inj.reset()


# ldtilecfg [rdi]; tilezero tmm0; int3 -- the first tile instruction in a thread makes the
# kernel grow its xstate buffer, after which PTRACE_SETREGSET accepts AMX tile data.
AMX_TOUCH = bytes.fromhex("c4e2784907" "c4e27b49c0" "cc")
AMX_PALETTE = bytes([1]) + bytes(15) + struct.pack("<H", 64) + bytes(30) + bytes([16]) + bytes(15)


def touch_amx(inj, thread) -> None:
    """Run one tile instruction in `thread` (see AMX_TOUCH)."""
    code = inj.code_at(16, AMX_TOUCH)
    cfg = inj.put(AMX_PALETTE)
    regs = native.new_regs()
    native.ffi.memmove(regs, thread.regs, native.ffi.sizeof("struct user_regs_struct"))
    regs.rip, regs.rdi, regs.orig_rax = code, cfg, (1 << 64) - 1
    native.set_regs(thread.tid, regs)
    native.cont(thread.tid, 0)
    status = native.wait(thread.tid)
    inj.reset()
    if (status >> 8) != 5:  # SIGTRAP from the int3
        raise OSError(5, f"AMX first use in thread {thread.tid} stopped with status {status:#x}")
