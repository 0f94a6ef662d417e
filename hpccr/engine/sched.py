"""Scheduling of each thread: its CPU affinity (HPC runtimes bind ranks and OpenMP threads to
cores), nice value, and policy with its priority.

All of it is read and set from outside, by tid (sched_getaffinity, getpriority,
sched_getscheduler and their setters): no injection.  At restore the affinity is the saved
CPUs that this machine lets the restorer use (its own mask: under Slurm, the job's cpuset); if
none of them is here, the thread keeps the restorer's.  An image a user could have written may
not raise a thread's priority above an ordinary process's (negative nice, real-time policies):
that would be a privilege the restorer, not the user, has.
"""

from __future__ import annotations

import os

from hpccr.errors import AccessDenied, UnsupportedResource

SCHED_RESET_ON_FORK = 0x40000000
ORDINARY = (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE)  # no privilege needed
REALTIME = (os.SCHED_FIFO, os.SCHED_RR)


def dump(pid: int, tid: int) -> dict:
    policy = os.sched_getscheduler(tid)
    if policy & ~SCHED_RESET_ON_FORK not in ORDINARY + REALTIME:
        raise UnsupportedResource(f"process {pid} thread {tid} has scheduling policy {policy} "
                                  "(SCHED_DEADLINE?): not supported yet")
    return {"affinity": sorted(os.sched_getaffinity(tid)),
            "nice": os.getpriority(os.PRIO_PROCESS, tid), "policy": policy,
            "priority": os.sched_getparam(tid).sched_priority}


def check(proc: dict, trusted: bool) -> None:
    """Before anything is created: refuse what a user's image may not ask for."""
    for thread in proc["threads"]:
        sched = thread["sched"]
        policy = sched["policy"] & ~SCHED_RESET_ON_FORK
        if policy not in ORDINARY + REALTIME:
            raise UnsupportedResource(f"thread {thread['tid']}: unknown scheduling policy "
                                      f"{sched['policy']}")
        if not trusted and (policy not in ORDINARY or sched["nice"] < 0):
            raise AccessDenied(f"thread {thread['tid']} of the image has a real-time policy or "
                               "a negative nice value, which its owner may not give it: "
                               "refused")


def restore(tid: int, sched: dict) -> None:
    """From the restorer, once thread `tid` (as hpccr sees it) exists."""
    cpus = set(sched["affinity"]) & os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(tid, cpus)
    os.sched_setscheduler(tid, sched["policy"], os.sched_param(sched["priority"]))
    os.setpriority(os.PRIO_PROCESS, tid, sched["nice"])
