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
- A job on several nodes is one part per node (hpccr/engine/overlay.py): the batch host's, at
  node slot 0, runs the script; one `srun` step starts `hpccr slurm part` on every other node,
  whose part is a launch server (hpccr/mpi/launch.py) through which the job's MPI launchers
  start their daemons there.  The part at slot 0 takes the checkpoints of all
  (hpccr/mpi/coordinate.py); a restart restores every part of the latest one, each on the node
  at its slot in the new allocation.  A part that ends badly while the job runs (its hpccr
  lost, its restore failed) ends that step, and the job: it cannot run on without the ranks
  that were there (see OtherParts).
"""

from __future__ import annotations

import contextlib
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
from hpccr.mpi import launch
from hpccr.mpi.coordinate import part_image
from hpccr.run import STOPPED, line_start
from hpccr.slurm import agent
from hpccr.slurm.hooks import run_hooks

STOP_SIGNALS = (signal.SIGUSR1,)
SLURM_SCRIPT = "slurm_script"  # the batch script's name in slurmd's spool directory
JOB_SCRIPT = "job-script"  # its copy in the job's checkpoint directory
SLURM_COMMAND_TIMEOUT_S = 30
SLURM_NODES = launch.SLURM_NODES
JOB_ERRORS = "HPCCR_JOB_ERRORS"  # the batch step's stderr file, where parts write theirs
PARTS_STOP_S = 60  # for the other parts to end after a final checkpoint has stopped them
PARTS_TERM_S = 30  # for the other parts to end once told to (the job's script has ended)
SIGNAL_STEPS_S = 5  # scancel retries while the job is being cancelled or requeued


def warn(message: str) -> None:
    """One line on stderr, the job's output file: on a line of its own even when the job's
    last write, cut short by a requeue, ended mid-line."""
    print(f"{line_start()}hpccr: {message}", file=sys.stderr, flush=True)


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

    def wait(self, parts: OtherParts | None = None) -> int:
        """The child's exit status, 128+N when it was killed by signal N (like a shell); the
        child gets SIGTERM if the job loses `parts`."""
        try:
            if self.events is not None:
                _answer_until_exit(self.events, self.child.pid, parts)
            status = self.child.wait()
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status


def _answer_until_exit(events: socket.socket, pid: int, parts: OtherParts | None) -> None:
    pidfd = os.pidfd_open(pid)
    watched = [pidfd, events, *([parts] if parts else [])]
    try:
        while True:
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if pidfd in ready:
                return
            if parts in ready:
                watched.remove(parts)
                if parts.lost():
                    os.kill(pid, signal.SIGTERM)
            if events in ready and not answer_events(events, hook_event):
                watched.remove(events)
    finally:
        os.close(pidfd)


class OtherParts:
    """The step that runs the job's parts on its other nodes, watched from the batch step
    while the job runs.  A part that ends badly ends the step (srun --kill-on-bad-exit): its
    hpccr was lost, and Slurm ended its processes with it, or its restore failed.  The job
    cannot run on without those ranks, and would not notice by itself that they are gone when
    that happens in a checkpoint (their connections are locked then, so their end reaches no
    peer): the job's supervisor gets SIGTERM, which it passes on, and the job fails, to be
    requeued from its latest checkpoint.  A step that ends well (every part stopped by the
    job's final checkpoint) is no loss."""

    def __init__(self, step: subprocess.Popen):
        self.step = step
        self.pidfd = os.pidfd_open(step.pid)

    def fileno(self) -> int:
        return self.pidfd

    def lost(self) -> bool:
        """Once the step has ended: whether it ended badly, which is said in the job's
        output."""
        status = self.step.wait()
        if status == 0:
            return False
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')} lost its part on another node (the "
             f"step of its parts ended with status {status}): the job is ended")
        return True

    def close(self) -> None:
        os.close(self.pidfd)


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
    parts = None
    try:
        nodes = job_nodes()
        if nodes:
            parts = _start_parts(nodes, run)
        status = (_under_agent(cfg, run, parts) if os.geteuid() != 0
                  else _under_hpccr(run, parts))
    except agent.AgentLost as exc:  # the job may run under the lost agent: never twice
        _end_parts(parts, None)
        warn(f"job {job_id}: {exc}")
        return 1
    except HpccrError as exc:
        _end_parts(parts, None)
        if run.restore:  # never start over on top of checkpoints that did not restore
            run_hooks("after_restore", path=str(latest), ok=False, error=str(exc))
            warn(f"job {job_id}: restoring {latest} failed, the checkpoints are kept: {exc}")
            return 1
        warn(f"job {job_id} runs without checkpoints: {exc}")
        return None
    _end_parts(parts, status)
    if status == STOPPED and Series(series).latest() not in (None, latest):
        requeue(job_id)
    return status


def job_nodes() -> list[str]:
    """For a job on several nodes: its nodes, the batch host (this one) first, which slot 0
    has; their addresses by slot and the part's slot are set in the environment for hpccr
    (HPCCR_JOB_NODES, HPCCR_NODE_SLOT).  [] for a job on one node."""
    if int(os.environ.get("SLURM_JOB_NUM_NODES") or 1) < 2:
        return []
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    names = _slurm("scontrol", "show", "hostnames", nodelist).split()
    here = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    if here not in names:
        raise HpccrError(f"this node ({here}) is not in the job's node list {names}")
    names = [here, *(name for name in names if name != here)]
    try:
        addresses = [socket.gethostbyname(name) for name in names]
    except OSError as exc:
        raise HpccrError(f"cannot find the addresses of the job's nodes: {exc}") from None
    os.environ.update({"HPCCR_JOB_NODES": ",".join(addresses), "HPCCR_NODE_SLOT": "0",
                       SLURM_NODES: ",".join(names)})
    with contextlib.suppress(OSError):
        errors = os.readlink("/proc/self/fd/2")
        if os.path.isfile(errors):
            os.environ[JOB_ERRORS] = errors
    return names


def _slurm(command: str, *args: str, timeout: float = SLURM_COMMAND_TIMEOUT_S) -> str:
    """The output of Slurm's `command` (scontrol, scancel) with `args`."""
    program = shutil.which(command)
    if program is None:
        raise HpccrError(f"{command} is not installed here")
    try:
        res = subprocess.run([program, *args], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HpccrError(f"`{command} {' '.join(args)}` failed: {exc}") from None
    if res.returncode != 0:
        raise HpccrError(f"`{command} {' '.join(args)}` failed: "
                         f"{res.stderr.strip() or res.returncode}")
    return res.stdout


def _start_parts(nodes: list[str], run: Run) -> OtherParts:
    """One step with a task on each node but this one: `hpccr slurm part`, which runs (or
    restores) that node's part of the job; a task that ends badly ends them all."""
    srun = shutil.which("srun")
    if srun is None:
        raise HpccrError("srun is not installed here: the job's other nodes cannot be reached")
    others = str(len(nodes) - 1)
    argv = [srun, "--nodes", others, "--ntasks", others, "--ntasks-per-node=1", "--relative=1",
            "--overlap", "--kill-on-bad-exit=1", "--export=ALL", sys.executable, "-m", "hpccr",
            "slurm", "part", "--checkpoint-dir", str(run.series)]
    return OtherParts(subprocess.Popen([*argv, "--restore"] if run.restore else argv,
                                       stdin=subprocess.DEVNULL))


def _end_parts(other: OtherParts | None, status: int | None) -> None:
    """The job's script has ended (or could not start): so do the other parts.  After a final
    checkpoint (STOPPED) they stop by themselves; else their launch servers get SIGHUP, sent
    to the job's steps (srun would end the step by force; a SIGTERM from scancel reads as a
    cancel in the job's output), and end.  A job being cancelled or requeued cannot be
    signalled (scancel retries): srun then ends the step."""
    if other is None:
        return
    other.close()
    parts = other.step
    if status == STOPPED:
        with contextlib.suppress(subprocess.TimeoutExpired):
            parts.wait(PARTS_STOP_S)
    if parts.poll() is None:
        with contextlib.suppress(HpccrError, subprocess.TimeoutExpired):
            _slurm("scancel", "--quiet", "--signal=HUP", os.environ["SLURM_JOB_ID"],
                   timeout=SIGNAL_STEPS_S)
            parts.wait(PARTS_TERM_S)
    if parts.poll() is None:  # the job is being cancelled or requeued, or a part hangs
        parts.terminate()
        try:
            parts.wait(PARTS_TERM_S)
        except subprocess.TimeoutExpired:
            parts.kill()
            parts.wait()


def run_part(directory: str, restore: bool) -> int:
    """In the job's step on a node other than the batch host: this node's part of the job
    (its launch server; or its part of the latest checkpoint), with /dev/null as stdin and
    stdout and the job's error file as stderr (a process of the job may hold no descriptor
    of slurmstepd's)."""
    names = os.environ.get(SLURM_NODES, "").split(",")
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    if node not in names[1:]:
        warn(f"hpccr slurm part: {node} is not one of the job's other nodes ({SLURM_NODES})")
        return 2
    slot = names.index(node)
    os.environ["HPCCR_NODE_SLOT"] = str(slot)
    _part_stdio(os.environ.get(JOB_ERRORS))
    latest = Series(Path(directory)).latest() if restore else None
    if latest is not None and not part_image(latest, slot).exists():
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')}: {latest} has no part for {node} "
             f"(slot {slot}): the job runs on fewer nodes than it was given, this one idle")
        return 0
    launch_server = [launch.executable(), "--serve"]
    try:
        cfg = config.load()
        run = Run(launch_server, Path(directory), None, cfg.keep, restore)
        status = _under_agent(cfg, run) if os.geteuid() != 0 else _under_hpccr(run)
    except (ConfigError, HpccrError) as exc:
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')}: its part on {node} (slot {slot}) "
             f"failed: {exc}")
        return 1
    return 0 if status == STOPPED else status  # stopped by the job's final checkpoint


def _part_stdio(errors: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        err = os.open(errors, os.O_WRONLY | os.O_APPEND) if errors else null
    except OSError:
        err = null
    for fd, target in ((0, null), (1, null), (2, err)):
        os.dup2(target, fd)
    for fd in {null, err}:
        os.close(fd)


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


def _under_agent(cfg: config.Config, run: Run, parts: OtherParts | None = None) -> int:
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
        return session.wait(parts)
    except (HpccrError, OSError) as exc:
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')}: {exc}")
        return 1


def _under_hpccr(run: Run, parts: OtherParts | None = None) -> int:
    """As root: `hpccr run` or `hpccr restore` as a child."""
    events, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tempfile.TemporaryDirectory(prefix="hpccr-job-") as tmp, events:
        pidfile = Path(tmp) / "pid"
        argv = run.hpccr_argv(pidfile, events_fd=far_end.fileno())
        with far_end:
            supervisor = Supervisor(argv, events, pass_fds=(far_end.fileno(),))
        status = supervisor.wait(parts)
        if not pidfile.exists():
            raise HpccrError(f"`hpccr {'restore' if run.restore else 'run'}` could not start "
                             "the job (its error is above)")
    return status


def requeue(job_id: str) -> None:
    """Put the job back in the queue after its final checkpoint.  Said before it is done: the
    requeue ends this batch step, maybe before a line written after it reaches the output."""
    warn(f"job {job_id} requeued; it goes on from its checkpoint when it runs again")
    try:
        _slurm("scontrol", "requeue", job_id)
    except HpccrError as exc:
        warn(f"job {job_id} was checkpointed but cannot be requeued: {exc}")
