"""A job as its parent sees it: the namespaces of a job started by `hpccr run` (made again for
each restore of its images), the signals passed on to it, and its exit status."""

from __future__ import annotations

import os
import signal

from hpccr import native
from hpccr.engine import netns

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x20000, 0x8000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT)


def enter_job_namespaces(network: netns.Spec | None) -> None:
    """In pid 1 of a new pid namespace: private mounts with its own /proc, own IPC namespace;
    with `network`, the job's host name (its network namespace is made by the parent, which
    forks from inside it)."""
    native.syscall("unshare", CLONE_NEWNS | CLONE_NEWIPC)
    native.mount("", "/", "", MS_REC | MS_PRIVATE)
    native.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if network is not None:
        netns.enter(network)


def fork_into_new_pid_namespace(fork=os.fork) -> int:
    """fork() whose child is pid 1 of a new pid namespace; returns like fork().

    unshare(CLONE_NEWPID) moves only the caller's future children, and while they would go to
    another namespace the caller may not create threads (EINVAL): so the caller goes back to
    its own namespace for children right after the fork."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        native.syscall("unshare", CLONE_NEWPID)
        pid = fork()
        if pid:
            native.syscall("setns", own, CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def forward_signals(pid: int) -> None:
    """Pass the usual termination and job-control signals sent to us on to `pid`."""
    def forward(signo, _frame):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N when killed by signal N."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
