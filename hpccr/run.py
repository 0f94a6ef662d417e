"""`hpccr run`: start a job in its own pid, mount and IPC namespaces, and checkpoint it
periodically.

The job's pid 1 is hpccr-init, which runs the command, forwards signals to it and reaps orphans.
Because the job's pids live in a namespace of their own, a restore recreates a fresh namespace
with the same pids and can never collide with pids in use on the machine.
"""

from __future__ import annotations

import os
import select
import sys
import time
from importlib import resources

from hpccr.engine.job import (
    enter_job_namespaces,
    exit_code,
    fork_into_new_pid_namespace,
    forward_signals,
)
from hpccr.errors import HpccrError
from hpccr.image.series import Series


def init_path() -> str:
    return str(resources.files("hpccr.native") / "hpccr-init")


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
    forward_signals(pid)
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
                return exit_code(os.waitpid(pid, 0)[1])
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
