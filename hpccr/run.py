"""`hpccr run`: start a job in its own pid, mount and IPC namespaces, and checkpoint it
periodically.

The job's pid 1 is hpccr-init, which runs the command, forwards signals to it and reaps orphans.
Because the job's pids live in a namespace of their own, a restore recreates a fresh namespace
with the same pids and can never collide with pids in use on the machine.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from importlib import resources

from hpccr import native
from hpccr.errors import HpccrError
from hpccr.image.series import Series

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x20000, 0x8000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT)


def init_path() -> str:
    return str(resources.files("hpccr.native") / "hpccr-init")


def _mount(source: str, target: str, fstype: str, flags: int) -> None:
    args = [native.ffi.new("char[]", s.encode()) if s else native.ffi.NULL
            for s in (source, target, fstype)]
    native.syscall("mount", *(int(native.ffi.cast("long", a)) for a in args), flags, 0)


def enter_job_namespaces() -> None:
    """In pid 1 of a new pid namespace: private mounts with its own /proc, own IPC namespace."""
    native.syscall("unshare", CLONE_NEWNS | CLONE_NEWIPC)
    _mount("", "/", "", MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


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


def start_job(argv: list[str]) -> int:
    """Start hpccr-init running `argv` as pid 1 of new namespaces; returns its pid here.
    hpccr itself stays outside and traces the job from there."""
    if os.geteuid() != 0:
        raise HpccrError("hpccr run needs root for now (pid namespaces with exact pids)")
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = fork_into_new_pid_namespace()
    if pid == 0:
        try:
            os.close(rd)
            enter_job_namespaces()
            os.closerange(3, wr)
            os.closerange(wr + 1, 1 << 16)
            os.execv(init_path(), ["hpccr-init", *argv])
        except BaseException as exc:  # report, then die
            os.write(wr, str(exc).encode() or b"exec failed")
        finally:
            os._exit(127)
    os.close(wr)
    with os.fdopen(rd, "rb") as pipe:
        error = pipe.read().decode(errors="replace")
    if error:
        os.waitpid(pid, 0)
        raise HpccrError(f"cannot start the job: {error}")
    return pid


def supervise(pid: int, series: Series | None, interval: float | None, keep: int,
              checkpoint) -> int:
    """Wait for the job, checkpointing it every `interval` seconds with checkpoint(pid, path)
    (a failed checkpoint is reported and the job runs on); returns its exit status."""
    def forward(signo, _frame):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    pidfd = os.pidfd_open(pid)
    next_at = time.monotonic() + interval if interval else None
    try:
        while True:
            timeout = None if next_at is None else max(0.0, next_at - time.monotonic())
            try:
                ready, _, _ = select.select([pidfd], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) \
                    else 128 + os.WTERMSIG(status)
            path = series.next_path()
            try:
                checkpoint(pid, path)
                series.publish(path, keep)
            except HpccrError as exc:
                print(f"hpccr run: checkpoint {path} failed, the job runs on: {exc}",
                      file=sys.stderr)
            next_at = time.monotonic() + interval
    finally:
        os.close(pidfd)
