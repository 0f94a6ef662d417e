"""`hpccr slurm job`: the batch script of a checkpointed job, and the job's life across requeues.

Both ways into checkpointing end here: the SPANK plugin puts etc/slurm/job.sh in place of the
batch script, and `hpccr sbatch` submits a wrapper script; each runs
`hpccr slurm job -- SCRIPT ARGS` as the batch step's top process, in the job's cgroup.  This
process stays in the foreground for the whole run:

- First run: the script runs under hpccr in a pid namespace of its own, checkpointed every
  interval into the job's directory.  Restart (SLURM_RESTART_COUNT > 0) with a complete
  checkpoint there: the newest one is restored instead, and checkpointed on from there.  A
  restart without one starts over, and says so in the job's output.
- USR1 (Slurm's warning before the time limit, `--signal=B:USR1@<grace>`, or a preemption
  notice sent with `scancel --batch --signal=USR1`) is the stop signal: one final checkpoint,
  the job is stopped, and `scontrol requeue` puts it back in the queue, to go on wherever Slurm
  starts it next.  If that checkpoint fails, the job runs on and the failure is in its output.
  SIGTERM is passed on, not a checkpoint trigger: Slurm sends it to every process of the job at
  once, so a checkpoint taken then could catch the job half dead.
- Root's jobs are run by `hpccr run` / `hpccr restore` directly; a user's by the job's agent
  (hpccr.slurm.agent, started by the prolog), which holds the privileges.  Without an agent
  (no prolog, or another node's) the script runs directly, without checkpoints, and one
  warning on stderr says why.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpccr import config
from hpccr.config import ConfigError
from hpccr.engine.job import FORWARDED
from hpccr.errors import HpccrError
from hpccr.events import answer_events
from hpccr.image.series import Series
from hpccr.run import STOPPED
from hpccr.slurm import agent
from hpccr.slurm.hooks import run_hooks

STOP_SIGNALS = (signal.SIGUSR1,)
SLURM_SCRIPT = "slurm_script"  # the batch script's name in slurmd's spool directory
JOB_SCRIPT = "job-script"  # its copy in the job's checkpoint directory
REQUEUE_TIMEOUT_S = 30


def warn(message: str) -> None:
    print(f"hpccr: {message}", file=sys.stderr, flush=True)


def default_dir(cfg: config.Config) -> Path:
    """<checkpoint_base>/<user>/<jobid> for the Slurm job this runs in."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ValueError("not inside a Slurm job (SLURM_JOB_ID not set) and no --checkpoint-dir")
    return cfg.job_dir(pwd.getpwuid(os.getuid()).pw_name, job_id)


class Supervisor:
    """Runs one child to its end, passing on the signals the batch shell receives and
    answering the checkpoint events it sends on `events` (hpccr.events) with the hooks."""

    def __init__(self, argv: list[str], events: socket.socket | None = None,
                 pass_fds: tuple[int, ...] = ()):
        self.child = subprocess.Popen(argv, pass_fds=pass_fds)
        self.events = events
        self.previous = {sig: signal.signal(sig, self.forward) for sig in FORWARDED}

    def forward(self, signo: int, _frame) -> None:
        if self.child.returncode is None:
            self.child.send_signal(signo)

    def wait(self) -> int:
        """The child's exit status, 128+N when it was killed by signal N (like a shell)."""
        try:
            if self.events is not None:
                _answer_until_exit(self.events, self.child.pid)
            status = self.child.wait()
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status


def _answer_until_exit(events: socket.socket, pid: int) -> None:
    pidfd = os.pidfd_open(pid)
    watched = [pidfd, events]
    try:
        while True:
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if pidfd in ready:
                return
            if not answer_events(events, hook_event):
                watched.remove(events)
    finally:
        os.close(pidfd)


def hook_event(event: str, fields: dict) -> None:
    """An event from hpccr (hpccr.events): the site's hooks for it, here, as the job's user."""
    if event in ("before_checkpoint", "after_checkpoint"):
        run_hooks(event, **{k: fields.get(k) for k in ("path", "ok", "error") if k in fields})
    elif event == "restored":
        run_hooks("after_restore", path=fields.get("path"), ok=True, error=None)


@dataclass
class Run:
    """One run of the job: what to do (start the script, or restore `series`'s latest)."""

    command: list[str]
    series: Path
    interval: int | None
    keep: int
    restore: bool

    def request(self) -> dict:
        return {"op": "restore" if self.restore else "run", "dir": str(self.series),
                "interval": self.interval, "keep": self.keep,
                "stop_signals": [int(s) for s in STOP_SIGNALS], "argv": self.command,
                "env": dict(os.environ), "cwd": os.getcwd()}

    def hpccr_argv(self, pidfile: Path, events_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "hpccr", "restore" if self.restore else "run",
                "-D", str(self.series), "--keep", str(self.keep), "--pidfile", str(pidfile),
                "--events-fd", str(events_fd)]
        argv += [f"--checkpoint-on={int(s)}" for s in STOP_SIGNALS]
        if self.interval:
            argv += ["--interval", f"{self.interval}s"]
        return argv if self.restore else [*argv, "--", *self.command]


def run_job(command: list[str], interval: int | None, directory: str | None) -> int:
    """Run (or restore) the job under hpccr, or directly when it cannot be; returns its
    status."""
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    try:
        cfg = config.load()
        series = Path(directory).absolute() if directory else default_dir(cfg)
        series.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (ConfigError, ValueError, OSError) as exc:
        cfg = series = None
        warn(f"job {job_id} runs without checkpoints: {exc}")
    if series is not None:
        os.environ["HPCCR_CHECKPOINT_DIR"] = str(series)
    if interval:
        os.environ["HPCCR_CHECKPOINT_INTERVAL"] = f"{interval}s"
    run_hooks("job_start", command=command, interval=interval)
    status = None
    if series is not None:
        status = _checkpointed_run(cfg, command, series, interval, job_id)
    if status is None:
        status = Supervisor(command).wait()
    run_hooks("job_end", exit_code=status)
    return status


def _checkpointed_run(cfg: config.Config, command: list[str], series: Path,
                      interval: int | None, job_id: str) -> int | None:
    """The run's status under hpccr, or None if hpccr could not start the job."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    latest = Series(series).latest() if restarts else None
    if restarts and latest is None:
        warn(f"restart {restarts} of job {job_id}: no complete checkpoint in {series}, "
             "starting over")
    elif latest is not None:
        warn(f"restart {restarts} of job {job_id}: restoring {latest}")
        run_hooks("before_restore", path=str(latest))
    if latest is None:
        command = _stable_script(command, series)
    run = Run(command, series, interval, cfg.keep, restore=latest is not None)
    try:
        status = _under_agent(cfg, run) if os.geteuid() != 0 else _under_hpccr(run)
    except HpccrError as exc:
        if run.restore:  # never start over on top of checkpoints that did not restore
            run_hooks("after_restore", path=str(latest), ok=False, error=str(exc))
            warn(f"job {job_id}: restoring {latest} failed, the checkpoints are kept: {exc}")
            return 1
        warn(f"job {job_id} runs without checkpoints: {exc}")
        return None
    if status == STOPPED and Series(series).latest() not in (None, latest):
        requeue(job_id)
    return status


def _stable_script(command: list[str], series: Path) -> list[str]:
    """Slurm runs a batch script from a copy in the node's spool directory, which is gone once
    the run ends: the shell running it holds it open, so a restore on another node would miss
    it.  The job runs a copy in its checkpoint directory instead (on the shared file system)."""
    script = Path(command[0])
    if script.name != SLURM_SCRIPT or not script.is_file():
        return command
    copy = series / JOB_SCRIPT
    try:
        shutil.copyfile(script, copy)
        copy.chmod(0o700)
    except OSError as exc:
        warn(f"cannot copy the batch script to {copy} ({exc.strerror}): its checkpoints "
             "can only be restored on this node")
        return command
    return [str(copy), *command[1:]]


def _under_agent(cfg: config.Config, run: Run) -> int:
    """The run's status under the job's agent; HpccrError if the agent could not start it.
    Once it started, the job is never started again here: an agent lost on the way ends the
    run with status 1 (Slurm then ends what is left of the job, in its cgroup)."""
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    path = agent.socket_path(cfg.run_dir, os.environ.get("SLURM_JOB_ID", "?"), node)
    if not path.exists():
        raise HpccrError(f"no hpccr agent for this job on {node} ({path}; is hpccr's prolog "
                         "configured?)")
    session = agent.AgentSession(path, run.request(), hook_event)
    try:
        return session.wait()
    except (HpccrError, OSError) as exc:
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')}: {exc}")
        return 1


def _under_hpccr(run: Run) -> int:
    """As root: `hpccr run` or `hpccr restore` as a child."""
    events, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tempfile.TemporaryDirectory(prefix="hpccr-job-") as tmp, events:
        pidfile = Path(tmp) / "pid"
        argv = run.hpccr_argv(pidfile, events_fd=far_end.fileno())
        with far_end:
            supervisor = Supervisor(argv, events, pass_fds=(far_end.fileno(),))
        status = supervisor.wait()
        if not pidfile.exists():
            raise HpccrError(f"`hpccr {'restore' if run.restore else 'run'}` could not start "
                             "the job (its error is above)")
    return status


def requeue(job_id: str) -> None:
    """Put the job back in the queue after its final checkpoint."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        warn(f"job {job_id} was checkpointed but cannot be requeued: no scontrol")
        return
    try:
        res = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True,
                             timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        warn(f"job {job_id} was checkpointed but `scontrol requeue` failed: {exc}")
        return
    if res.returncode != 0:
        warn(f"job {job_id} was checkpointed but `scontrol requeue` failed: "
             f"{res.stderr.strip() or res.returncode}")
    else:
        warn(f"job {job_id} requeued; it goes on from its checkpoint when it runs again")
