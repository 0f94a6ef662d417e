"""Signals: dispositions, blocked masks, queued (pending) signals, alternate stacks, itimers."""

from __future__ import annotations

import base64
import functools
import signal
import struct

from hpccr import native

NSIG = 64
SIGKILL, SIGSTOP = 9, 19
SIGACTION = struct.Struct("<QQQQ")  # kernel struct sigaction: handler, flags, restorer, mask
STACK_T = struct.Struct("<QiiQ")  # ss_sp, ss_flags, (pad), ss_size
ITIMERVAL = struct.Struct("<qqqq")  # interval (sec, usec), value (sec, usec)
ITIMERS = ("real", "virtual", "prof")
SS_ONSTACK = 1


def dump_sigactions(inj) -> list[dict]:
    """Every disposition that is not SIG_DFL, read with injected rt_sigaction calls."""
    out = []
    area = inj.alloc(SIGACTION.size * NSIG)
    for signo in range(1, NSIG + 1):
        if signo not in (SIGKILL, SIGSTOP):
            inj.call("rt_sigaction", signo, 0, area + (signo - 1) * SIGACTION.size, 8)
    raw = inj.get(area, SIGACTION.size * NSIG)
    for signo in range(1, NSIG + 1):
        handler, flags, restorer, mask = SIGACTION.unpack_from(raw, (signo - 1) * SIGACTION.size)
        if handler and signo not in (SIGKILL, SIGSTOP):
            out.append({"signo": signo, "handler": handler, "flags": flags,
                        "restorer": restorer, "mask": mask})
    inj.reset()
    return out


def restore_sigactions(inj, actions: list[dict], thread=None) -> None:
    """In the leader, or in `thread` (a process sharing the injector's address space)."""
    for act in actions:
        ptr = inj.put(SIGACTION.pack(act["handler"], act["flags"], act["restorer"], act["mask"]))
        inj.call("rt_sigaction", act["signo"], ptr, 0, 8, thread=thread)
    inj.reset()


def dump_itimers(inj) -> dict[str, list[int]]:
    out = {}
    area = inj.alloc(ITIMERVAL.size)
    for which, name in enumerate(ITIMERS):
        inj.call("getitimer", which, area)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(inj.get(area, ITIMERVAL.size))
        out[name] = [isec * 10**6 + iusec, vsec * 10**6 + vusec]
    inj.reset()
    return out


@functools.cache
def cpu_timer_tick_us() -> int:
    """setitimer() adds one scheduler tick to a CPU-time timer (kernel set_cpu_itimer) that
    getitimer() does not take off again; measured once on this kernel."""
    old = signal.setitimer(signal.ITIMER_PROF, 1.0)
    got = signal.getitimer(signal.ITIMER_PROF)[0]
    signal.setitimer(signal.ITIMER_PROF, *old)
    return max(0, round((got - 1.0) * 10**6))


def restore_itimers(inj, itimers: dict[str, list[int]], thread=None) -> None:
    """In the leader, or in `thread` (a process sharing the injector's address space)."""
    for which, name in enumerate(ITIMERS):
        interval, value = itimers[name]
        if value and name != "real":
            value = max(1, value - cpu_timer_tick_us())
        # A real timer with nothing left has fired and its SIGALRM is pending: taking that
        # signal is what re-arms it.  setitimer() with a zero value would disarm it (interval
        # and all), so it is armed to fire at once instead: its SIGALRM merges with the pending
        # one, and taking it re-arms the timer with its interval, as before the dump.
        if name == "real" and interval and not value:
            value = 1
        if value:
            ptr = inj.put(ITIMERVAL.pack(*divmod(interval, 10**6), *divmod(value, 10**6)))
            inj.call("setitimer", which, ptr, 0, thread=thread)
    inj.reset()


def dump_altstack(inj, thread) -> dict[str, int]:
    area = inj.alloc(STACK_T.size)
    inj.call("sigaltstack", 0, area, thread=thread)
    sp, flags, _, size = STACK_T.unpack(inj.get(area, STACK_T.size))
    inj.reset()
    return {"sp": sp, "flags": flags, "size": size}


def restore_altstack(inj, thread, altstack: dict[str, int]) -> None:
    if altstack["sp"] or altstack["size"]:
        ptr = inj.put(STACK_T.pack(altstack["sp"], altstack["flags"] & ~SS_ONSTACK, 0,
                                   altstack["size"]))
        inj.call("sigaltstack", ptr, 0, thread=thread)
        inj.reset()


def dump_pending(tid: int, shared: bool) -> list[str]:
    return [base64.b64encode(info).decode() for info in native.peek_siginfo(tid, shared)]


def queue_pending(inj, pid: int, infos: list[str], thread=None, tid: int = 0) -> None:
    """Queue saved signals again.  Only the receiver itself may queue a signal with any si_code
    (SI_USER, SI_TKILL, kernel codes), so a thread's own signals are queued from that thread
    (`thread`, whose id inside its pid namespace is `tid`) and the process-wide ones from the
    leader, whose tid is the pid.  `pid` is the id inside the process's pid namespace."""
    for encoded in infos:
        info = base64.b64decode(encoded)
        signo = struct.unpack_from("<i", info)[0]
        ptr = inj.put(info)
        if thread is None:
            inj.call("rt_sigqueueinfo", pid, signo, ptr)
        else:
            inj.call("rt_tgsigqueueinfo", pid, tid, signo, ptr, thread=thread)
        inj.reset()
