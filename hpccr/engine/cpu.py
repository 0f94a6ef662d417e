"""CPU state of a thread: general registers, the full xstate (AVX-512, AMX), and the fix-up of a
system call that was interrupted by the freeze so that it is re-issued after restore."""

from __future__ import annotations

import struct

from hpccr import native

XSTATE_SW_XFEATURES = 464  # XCR0, in the sw-reserved bytes of the FXSAVE area (asm/user.h)
XSTATE_HEADER = 512  # xstate_bv is the first u64 of the XSAVE header
XFEATURE_XTILECFG, XFEATURE_XTILEDATA = 17, 18

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
TIMER_ABSTIME = 1
NOT_IN_SYSCALL = (1 << 64) - 1


def xfeatures(xstate: bytes) -> int:
    """The XCR0 feature mask the kernel recorded in an xstate regset."""
    return struct.unpack_from("<Q", xstate, XSTATE_SW_XFEATURES)[0]


def features_in_use(xstate: bytes) -> int:
    return struct.unpack_from("<Q", xstate, XSTATE_HEADER)[0]


def uses_amx_tiles(xstate: bytes) -> bool:
    return bool(features_in_use(xstate) & (1 << XFEATURE_XTILEDATA))


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def resume_regs(regs: dict[str, int]) -> dict[str, int]:
    """Registers to restore for a thread saved while stopped: a system call the freeze
    interrupted is set up to be issued again, as the kernel itself would have done.

    ERESTART_RESTARTBLOCK (relative sleeps) cannot use restart_syscall(): its restart block was
    kernel state.  The call is issued again instead; nanosleep and relative clock_nanosleep wrote
    the remaining time to their `rem` argument when interrupted, so that becomes the request."""
    out = dict(regs)
    if regs["orig_rax"] == NOT_IN_SYSCALL:
        return out
    ret, nr = _signed(regs["rax"]), regs["orig_rax"]
    if -ret in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
        out["rax"] = nr
        out["rip"] = regs["rip"] - 2  # back onto the 2-byte `syscall` instruction
        if -ret == ERESTART_RESTARTBLOCK:
            if nr == native.SYS["nanosleep"] and regs["rsi"]:
                out["rdi"] = regs["rsi"]
            elif (nr == native.SYS["clock_nanosleep"] and regs["r10"]
                  and not regs["rsi"] & TIMER_ABSTIME):
                out["rdx"] = regs["r10"]
    out["orig_rax"] = NOT_IN_SYSCALL
    return out
