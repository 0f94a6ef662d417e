"""POSIX timers (timer_create): which timers a process has, how each notifies, what is left.

Dump: /proc/PID/timers lists every timer with its id, signal and sigev_value, notification
(signal to the process, to one thread, or none) and clock; an injected timer_gettime gives the
time left and the period, timer_getoverrun the overrun of the last expiry delivered.

Restore: the kernel numbers timers itself, but since Linux 6.16 a process with
PR_TIMER_CREATE_RESTORE_IDS on gets from timer_create the id it asks for in the timer_t it
passes in.  Each timer is created again with its sigevent and armed with the time it had left
(relative: time stands still for it while the job is checkpointed, as for timerfds) and its
period.  The overrun cannot be set: it is recorded for `hpccr show` only.
"""

from __future__ import annotations

import errno
import os
import struct

from hpccr.engine import procfs
from hpccr.errors import IncompatibleMachine, RestoreFailed, UnsupportedResource

PR_TIMER_CREATE_RESTORE_IDS = 77  # include/uapi/linux/prctl.h
PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON = 0, 1
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE}
SIGEVENT = struct.Struct("<Qii48x")  # sigev_value, sigev_signo, sigev_notify, _tid + padding
TID = struct.Struct("<i")  # sigev_notify_thread_id, at offset 16
ITIMERSPEC = struct.Struct("<qqqq")  # interval (sec, nsec), value (sec, nsec)
NS = 10**9


def read_timers(pid: int) -> list[dict]:
    """/proc/PID/timers as records: id, signo, value (sigev_value), notify, tid (as this /proc
    shows it, for SIGEV_THREAD_ID) and clockid."""
    with open(procfs.path(pid, "timers")) as f:
        lines = f.read().splitlines()
    timers, timer = [], {}
    for line in lines:
        key, _, value = line.partition(": ")
        if key == "ID":
            timer = {"id": int(value)}
            timers.append(timer)
        elif key == "signal":
            signo, sival = value.split("/")
            timer.update(signo=int(signo), value=int(sival, 16))
        elif key == "notify":
            how, target = value.split("/")
            kind, number = target.split(".")
            timer.update(notify=NOTIFY[how] | (SIGEV_THREAD_ID if kind == "tid" else 0),
                         tid=int(number) if kind == "tid" else 0)
        elif key == "ClockID":
            timer["clockid"] = int(value)
    return timers


def _check_clock(pid: int, clockid: int) -> None:
    """Clocks of the machine, or the process's own CPU-time clock; not another task's."""
    if clockid >= 0:
        return
    if clockid & 4 or ~(clockid >> 3) != 0:
        raise UnsupportedResource(f"process {pid} has a POSIX timer on a thread's or another "
                                  f"process's CPU-time clock ({clockid}): not supported yet")


def dump_timers(inj, pid: int, inner_tid) -> list[dict]:
    """Every POSIX timer of the frozen process `pid`; `inner_tid(tid)` turns a tid as hpccr
    sees it into the one the image records."""
    out = []
    area = inj.alloc(ITIMERSPEC.size)
    for timer in read_timers(pid):
        _check_clock(pid, timer["clockid"])
        if timer["notify"] & SIGEV_THREAD_ID and not timer["tid"]:
            raise UnsupportedResource(f"process {pid} has POSIX timer {timer['id']} signalling "
                                      "a thread that exited: not supported")
        inj.call("timer_gettime", timer["id"], area)
        isec, insec, vsec, vnsec = ITIMERSPEC.unpack(inj.get(area, ITIMERSPEC.size))
        out.append({
            "id": timer["id"], "clockid": timer["clockid"], "notify": timer["notify"],
            "signo": timer["signo"], "value": timer["value"],
            "tid": inner_tid(timer["tid"]) if timer["tid"] else 0,
            "interval_ns": isec * NS + insec, "value_ns": vsec * NS + vnsec,
            "overrun": inj.call("timer_getoverrun", timer["id"]),
        })
    inj.reset()
    return out


def restore_timers(inj, timers: list[dict]) -> None:
    """Create the timers with their saved ids and arm them, from the process's leader (its
    other threads must exist already: SIGEV_THREAD_ID names them)."""
    if not timers:
        return
    try:
        inj.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise IncompatibleMachine("POSIX timers need Linux 6.16 or later to be restored "
                                      "with their ids (PR_TIMER_CREATE_RESTORE_IDS)") from None
        raise
    for timer in timers:
        event = bytearray(SIGEVENT.pack(timer["value"], timer["signo"], timer["notify"]))
        TID.pack_into(event, 16, timer["tid"])
        event_ptr = inj.put(bytes(event))
        id_ptr = inj.put(TID.pack(timer["id"]))
        try:
            inj.call("timer_create", timer["clockid"], event_ptr, id_ptr)
        except OSError as exc:
            raise RestoreFailed(f"cannot create POSIX timer {timer['id']}: "
                                f"{os.strerror(exc.errno)}") from None
        created = TID.unpack(inj.get(id_ptr, TID.size))[0]
        if created != timer["id"]:
            raise RestoreFailed(f"POSIX timer {timer['id']} was created as {created}")
        if timer["value_ns"]:
            spec = inj.put(ITIMERSPEC.pack(*divmod(timer["interval_ns"], NS),
                                           *divmod(timer["value_ns"], NS)))
            inj.call("timer_settime", timer["id"], 0, spec, 0)
        inj.reset()
    inj.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_OFF, 0, 0, 0)
