"""`hpccr run`: start a job in its own pid, mount and IPC namespaces (and network and UTS
namespaces: engine/netns.py), and checkpoint it periodically.

With stop signals (--checkpoint-on, e.g. the batch system's warning before a time limit or a
preemption) the job is checkpointed one last time and stopped instead of being signalled.

The job's pid 1 is hpccr-init, which runs the command, forwards signals to it and reaps orphans.
Because the job's pids live in a namespace of their own, a restore recreates a fresh namespace
with the same pids and can never collide with pids in use on the machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpccr import config
from hpccr.engine import netns, overlay, procfs
from hpccr.engine.job import (
    FORWARDED,
    enter_job_namespaces,
    exit_code,
    fork_into_new_pid_namespace,
)
from hpccr.errors import HpccrError
from hpccr.image.series import Series, in_use
from hpccr.mpi import environment as mpi
from hpccr.user import User

# Exit status of `hpccr run` and `hpccr restore` when a stop signal ended the job after its final
# checkpoint (EX_TEMPFAIL: the job is not finished; restore its latest checkpoint to go on).
STOPPED = 75


def line_start() -> str:
    """"\n" if stderr is a regular file that does not end with one (read through a descriptor
    of its own: the job's is often opened for writing only): a message of hpccr's in the job's
    output starts a line of its own even when the job's last write ended mid-line (the job
    stopped or requeued in the middle of it)."""
    try:
        fd = sys.stderr.fileno()
        st = os.fstat(fd)
        if not st.st_size or not stat.S_ISREG(st.st_mode):
            return ""
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return "" if os.pread(reader, 1, st.st_size - 1) == b"\n" else "\n"
        finally:
            os.close(reader)
    except (OSError, ValueError):  # no descriptor, or a file this user cannot read
        return ""


def init_path() -> str:
    return str(resources.files("hpccr.native") / "hpccr-init")


def new_network(choice: str | None, environ=os.environ) -> netns.JobNetwork | None:
    """The network of a new job: its own ("own"), or the node's ("host": None).  `choice` None:
    the site's job_network; the address comes from its job_subnet, at the Slurm job's id."""
    if choice not in (None, *config.NETWORKS):
        raise HpccrError(f"no such job network: {choice!r} (own or host)")
    cfg = config.load()
    if (choice or cfg.job_network) == "host":
        return None
    job_id = environ.get("SLURM_JOB_ID", "")
    hint = int(job_id) if job_id.isdigit() else None
    part = job_part(environ)
    if part is None:
        return netns.JobNetwork(netns.choose(cfg.job_subnet, hint,
                                             f"job{job_id}" if hint is not None else None))
    job_id = job_id or environ.get("HPCCR_JOB_ID", "")
    if not job_id.isdigit():
        raise HpccrError("a job on several nodes (HPCCR_JOB_NODES) needs its id (SLURM_JOB_ID "
                         "or HPCCR_JOB_ID)")
    part_of = overlay.choose(cfg.overlay_subnet, cfg.overlay_ids, int(job_id), part.slot,
                             len(part.nodes), f"job{job_id}")
    spec = netns.Spec(part_of.address(), part_of.names[part_of.slot], part_of)
    return netns.JobNetwork(spec, nodes=part.nodes)


@dataclass(frozen=True)
class Part:
    """One part of a job on several nodes: its node slot, and the job's nodes (their
    addresses) by slot."""

    slot: int
    nodes: list[str]


def job_part(environ=os.environ) -> Part | None:
    """This part of a job on several nodes, from HPCCR_JOB_NODES (comma-separated) and
    HPCCR_NODE_SLOT; None for a job on one node."""
    text = environ.get("HPCCR_JOB_NODES", "").strip()
    if not text:
        return None
    nodes = [node.strip() for node in text.split(",")]
    slot = environ.get("HPCCR_NODE_SLOT", "")
    if not slot.isdigit() or int(slot) >= len(nodes):
        raise HpccrError(f"HPCCR_NODE_SLOT must be this part's node slot, 0 to "
                         f"{len(nodes) - 1}, not {slot!r}")
    return Part(int(slot), nodes)


def start_job(argv: list[str], user: User | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None, network: netns.JobNetwork | None = None) -> int:
    """Start hpccr-init running `argv` as pid 1 of new namespaces (as `user`, in `cwd`, with
    `env`, if given; in `network`, else in ours); returns its pid here.  hpccr itself stays
    outside and traces the job from there.  If the job cannot start, `network` is removed."""
    try:
        return _start_job(argv, user, env, cwd, network)
    except BaseException:
        if network is not None:
            network.remove()
        raise


def _start_job(argv: list[str], user: User | None, env: dict[str, str] | None,
               cwd: str | None, network: netns.JobNetwork | None) -> int:
    if os.geteuid() != 0:
        raise HpccrError("hpccr run needs root for now (pid namespaces with exact pids)")
    init = init_path()
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = network.fork_inside(fork_into_new_pid_namespace) if network else \
        fork_into_new_pid_namespace()
    if pid == 0:
        try:
            os.close(rd)
            enter_job_namespaces(network.spec if network else None)
            if user is not None:
                user.become()
            if cwd is not None:
                os.chdir(cwd)
            os.closerange(3, wr)
            os.closerange(wr + 1, 1 << 16)
            part_of = network.spec.overlay if network else None
            os.execve(init, ["hpccr-init", *argv],
                      mpi.job_environment(os.environ if env is None else env,
                                          part_of.names if part_of else ()))
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


class Checkpoints:
    """Where and how a supervised job is checkpointed: into `series` every `interval` seconds
    (None: only on a stop signal), keeping the newest `keep`; on one of `stop_signals` once more,
    after which the job is stopped.

    For a `part` of a job on several nodes, the part at slot 0 takes the checkpoints of all
    parts (hpccr/mpi/coordinate.py), and the others take part in them."""

    def __init__(self, series: Series | None, interval: float | None, keep: int,
                 stop_signals: tuple[int, ...] = (), notify=None, part: Part | None = None):
        if (interval or stop_signals) and series is None:
            raise HpccrError("checkpoints need a directory (-D)")
        self.series, self.interval, self.keep = series, interval, keep
        self.stop_signals = stop_signals
        self.notify = notify or (lambda event, **fields: None)  # hpccr.events.EventChannel
        self.part = part if part and len(part.nodes) > 1 else None
        if self.part and self.part.slot > 0:
            self.interval = None  # the part at slot 0 says when
        self.tracking = None  # engine/tracking.Tracking, from the first checkpoint on

    def member(self):
        """The coordinate.Member that takes part in the job's checkpoints, for a part other
        than slot 0 with a series; else None."""
        if self.part is None or self.part.slot == 0 or self.series is None:
            return None
        from hpccr.mpi.coordinate import Member
        return Member(self.series, self.part.slot, self.part.nodes[self.part.slot])

    def take(self, pid: int, mode: str) -> Path | None:
        """One checkpoint of the job (dump mode `mode`); its path, or None if it failed (said
        on stderr: the job runs on)."""
        from hpccr.engine.dump import dump
        from hpccr.engine.tracking import Tracking
        from hpccr.mpi import coordinate
        from hpccr.slurm.steps import refuse_running_steps

        path = self.series.next_path()
        self.notify("before_checkpoint", path=str(path))
        try:
            refuse_running_steps(pid)
            figures = {}
            if self.part is not None and self.part.slot > 0:
                raise HpccrError("the checkpoints of a job on several nodes are taken by its "
                                 "part at node slot 0")
            with in_use(self.series.dir, exclusive=True):
                if self.part is None:
                    if self.tracking is None:
                        self.tracking = Tracking(config.load().full_every)
                    dump(pid, str(path), mode, tracking=self.tracking)
                    self.series.publish(path, self.keep)
                else:
                    figures = coordinate.take(self.series, path, len(self.part.nodes), pid,
                                              mode, self.keep)
        except HpccrError as exc:
            if job_ended(pid):  # as the checkpoint began: nothing failed, nothing to take
                self.notify("after_checkpoint", path=str(path), ok=False,
                            error="the job ended")
                return None
            print(f"hpccr: checkpoint {path} failed, the job runs on: {exc}", file=sys.stderr,
                  flush=True)
            self.notify("after_checkpoint", path=str(path), ok=False, error=str(exc))
            return None
        self.notify("after_checkpoint", path=str(path), ok=True, error=None, **figures)
        return path


def job_ended(pid: int) -> bool:
    """Whether the job's root `pid`, a child of this process, has ended (not yet waited for):
    a zombie, not a process whose main thread alone exited."""
    state = procfs.state(pid)
    return state in (None, "X") or (state == "Z" and not procfs.leader_exited(pid))


class Supervision:
    """A job's parent: created before the job exists (so that no signal sent meanwhile is
    lost), then `run(pid)` waits for the job, checkpointing it as `checkpoints` says.

    Signals are passed on to the job, except stop signals: on one of those the job is
    checkpointed at once and killed (the checkpoint is complete before anything is killed).
    If that checkpoint fails the job runs on, and gets the signal only if it is SIGTERM (the
    batch system is ending the job anyway)."""

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.pid: int | None = None
        self.early: list[int] = []  # signals to pass on that came before the job existed
        self.stop_requests: list[int] = []
        self.wake_rd, self.wake_wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        for sig in checkpoints.stop_signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signo: int, _frame) -> None:
        if signo in self.checkpoints.stop_signals:
            self.stop_requests.append(signo)
            with contextlib.suppress(BlockingIOError):
                os.write(self.wake_wr, b"!")
        elif self.pid is None:
            self.early.append(signo)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signo)

    def run(self, pid: int, network: netns.JobNetwork | None = None) -> int:
        """The job's exit status, or STOPPED when a stop signal came and its final checkpoint
        is complete.  The job's own `network` is removed when it has ended."""
        self.pid = pid
        for signo in self.early:
            os.kill(pid, signo)
        pidfd = os.pidfd_open(pid)
        interval = self.checkpoints.interval
        next_at = time.monotonic() + interval if interval else None
        member = self.checkpoints.member()
        waited = [pidfd, self.wake_rd] + ([member] if member else [])
        try:
            while True:
                timeout = None if next_at is None else max(0.0, next_at - time.monotonic())
                try:
                    ready, _, _ = select.select(waited, [], [], timeout)
                except InterruptedError:
                    continue
                if pidfd in ready:
                    return exit_code(os.waitpid(pid, 0)[1])
                if member in ready:
                    if member.serve(pid, self.checkpoints.notify) == "kill":
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(pid, 0)
                        return STOPPED
                    continue
                if self.stop_requests:
                    if self._stop():
                        return STOPPED
                    continue
                self.checkpoints.take(pid, "running")
                next_at = time.monotonic() + interval
        finally:
            if member is not None:
                member.close()
            os.close(pidfd)
            os.close(self.wake_rd)
            os.close(self.wake_wr)
            if network is not None:
                network.remove()

    def _stop(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_rd, 64)
        signo = self.stop_requests[-1]
        self.stop_requests.clear()
        path = self.checkpoints.take(self.pid, "kill")
        if path is None:
            if signo == signal.SIGTERM:
                os.kill(self.pid, signo)
            return False
        with contextlib.suppress(ChildProcessError):  # the dump may have reaped it
            os.waitpid(self.pid, 0)
        print(f"{line_start()}hpccr: {signal.Signals(signo).name}: job checkpointed to {path} "
              "and stopped", file=sys.stderr, flush=True)
        return True
