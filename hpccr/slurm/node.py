"""`hpccr slurm prolog` and `hpccr slurm epilog`: run as root by slurmd on every node of a job.

Both must never fail a job: a failing prolog or epilog drains the node.  They therefore always
return normally and say what went wrong in the site log, <log_dir>/slurm.log (stderr when that
cannot be written).  They read the variables slurmd gives them: SLURM_JOB_ID, SLURM_JOB_UID,
SLURM_JOB_GID, SLURM_JOB_USER, SLURM_JOB_RESTART_COUNT, SLURM_JOB_NUM_NODES, SLURMD_NODENAME
and, in the epilog, SLURM_JOB_EXIT_CODE2.

Every node checks itself, but only the job's batch host — where the batch script, hence
`hpccr slurm job`, runs — makes, records and removes the job's directory (asking
`scontrol show job` for BatchHost when the job has more than one node), so that nodes sharing
the directory over the shared file system never race for it.  An ordinary user's job gets an
agent on every node: on the batch host for the script's part, on the others for theirs
(hpccr.slurm.job, a job on several nodes).

Keep or remove (epilog): a requeue (scontrol requeue, preemption, the lifecycle's own requeue
after its final checkpoint) raises the restart count before the epilog runs, so the epilog
compares it with the count the prolog wrote into RECORD when this run started.  The job's
checkpoints are removed only when the run was not requeued and `scontrol show job` reports
ExitCode=0:0; otherwise (failed, cancelled, timed out, requeued, or the controller could not
be asked) they are kept for the restart or for the user.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hpccr import config
from hpccr.config import DEFAULTS, ConfigError
from hpccr.engine import netlink, netlock, netns
from hpccr.errors import HpccrError
from hpccr.slurm import agent, jobdir
from hpccr.slurm.jobdir import Record, as_user

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_NAME = "slurm.log"
SCONTROL_TIMEOUT = 10


@dataclass
class SlurmJob:
    """The job as slurmd describes it to the prolog and epilog."""

    job_id: str
    uid: int
    gid: int
    user: str
    restart_count: int
    nodes: int
    node: str
    exit_code: str  # "status:signal", as SLURM_JOB_EXIT_CODE2 (epilog only)

    @classmethod
    def from_environ(cls, env) -> SlurmJob:
        missing = [v for v in ("SLURM_JOB_ID", "SLURM_JOB_UID", "SLURM_JOB_USER") if not env.get(v)]
        if missing:
            raise ValueError(f"not run by slurmd: {', '.join(missing)} not set")
        return cls(env["SLURM_JOB_ID"], int(env["SLURM_JOB_UID"]),
                   int(env.get("SLURM_JOB_GID") or env["SLURM_JOB_UID"]), env["SLURM_JOB_USER"],
                   int(env.get("SLURM_JOB_RESTART_COUNT") or 0),
                   int(env.get("SLURM_JOB_NUM_NODES") or 1),
                   env.get("SLURMD_NODENAME") or os.uname().nodename,
                   env.get("SLURM_JOB_EXIT_CODE2", "?"))


class SiteLog:
    """One line per event: `<time> <node> hpccr-<script>[<pid>]: job <id>: <message>`."""

    def __init__(self, log_dir: Path, script: str, node: str, job_id: str):
        self.path = log_dir / LOG_NAME
        self.prefix = f"{node} hpccr-{script}[{os.getpid()}]: job {job_id}:"

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.prefix} {message}\n"
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as exc:
            sys.stderr.write(f"{line.rstrip()} (cannot write {self.path}: {exc.strerror})\n")


def _setup(script: str, environ) -> tuple[SlurmJob, config.Config, SiteLog] | None:
    os.environ.setdefault("PATH", SAFE_PATH)  # slurmd runs prolog and epilog without one
    try:
        job = SlurmJob.from_environ(environ)
    except ValueError as exc:
        print(f"hpccr-{script}: {exc}", file=sys.stderr)
        return None
    try:
        cfg = config.load(environ)
    except ConfigError as exc:
        SiteLog(Path(DEFAULTS["log_dir"]), script, job.node, job.job_id)(
            f"checkpointing off, site configuration unusable: {exc}")
        return None
    return job, cfg, SiteLog(cfg.log_dir, script, job.node, job.job_id)


def node_verdict() -> str:
    """Whether this node can checkpoint and restore, from `hpccr check`'s probes."""
    from hpccr.engine.check import run_checks

    report = run_checks(required_only=True)
    return ("checkpointing possible" if report.ok
            else f"checkpointing impossible on this node: {report.summary()}")


def scontrol_job(job_id: str) -> dict[str, str]:
    """ExitCode, Restarts and BatchHost of a job from `scontrol show job` ({} if it cannot be
    asked)."""
    scontrol = shutil.which("scontrol", path=os.environ.get("PATH") or SAFE_PATH)
    if scontrol is None:
        return {}
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=SCONTROL_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"\b(ExitCode|Restarts|BatchHost)=(\S+)", out))


def other_batch_host(job: SlurmJob, state: dict[str, str]) -> str | None:
    """The job's batch host if it is not this node (None when it is, or is unknown)."""
    host = state.get("BatchHost")
    return host if host and host != job.node else None


def prolog(environ=os.environ) -> None:
    """Check the node; on the batch host, create (or, on a restart, reuse) the job's
    checkpoint directory."""
    setup = _setup("prolog", environ)
    if setup is None:
        return
    job, cfg, log = setup
    try:
        verdict = node_verdict()
    except Exception as exc:  # a probe that breaks must not fail the job
        verdict = f"checkpointing impossible on this node: check failed: {exc}"
    batch_host = other_batch_host(job, scontrol_job(job.job_id) if job.nodes > 1 else {})
    if batch_host:
        log(f"run {job.restart_count}: {verdict} (the job's directory is {batch_host}'s)")
        _start_agent_for(cfg, job, log)
        return
    try:
        user_dir = jobdir.ensure_user_dir(cfg.checkpoint_base, job.uid, job.gid)
        job_dir = user_dir / job.job_id
        with as_user(job.uid, job.gid):
            found = jobdir.checkpoints(job_dir)
            if job.restart_count == 0 and (found or jobdir.latest(job_dir)):
                # an earlier job with the same id (job ids start over after a state reset)
                shutil.rmtree(job_dir)
                log(f"removed {len(found)} checkpoints of an earlier job with this id")
                found = []
            job_dir.mkdir(mode=0o700, exist_ok=True)
            Record(job_dir).append(job.node, f"run {job.restart_count} started; {verdict}")
    except Exception as exc:  # whatever it is, the job runs (a failing prolog drains the node)
        log(f"no checkpoint directory: {exc}; {verdict}")
        return
    reuse = f" (restart, {len(found)} checkpoints)" if job.restart_count else ""
    log(f"run {job.restart_count} of {job.user}: {job_dir} ready{reuse}; {verdict}")
    _start_agent_for(cfg, job, log)


def _start_agent_for(cfg: config.Config, job: SlurmJob, log: SiteLog) -> None:
    if job.uid == 0:  # root's jobs need no agent
        return
    try:
        start_agent(cfg, job)
    except OSError as exc:
        log(f"no hpccr agent, the job runs without checkpoints: {exc}")


def start_agent(cfg: config.Config, job: SlurmJob) -> None:
    """The job's agent (hpccr.slurm.agent), detached: the prolog must return at once.  It
    logs to <log_dir>/agent.log."""
    cfg.log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(cfg.log_dir / "agent.log", "a") as log_file:
        subprocess.Popen([sys.executable, "-m", "hpccr", "slurm", "agent", "--job-id",
                          job.job_id, "--uid", str(job.uid), "--node", job.node],
                         stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd="/",
                         start_new_session=True)


def stop_agent(cfg: config.Config, job: SlurmJob) -> None:
    """Stop the job's agent if it is still there (the job did not use it, or was killed)."""
    pidfile = agent.pid_path(cfg.run_dir, job.job_id, job.node)
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if b"agent" in cmdline and job.job_id.encode() in cmdline:  # else the pid was reused
        os.kill(pid, signal.SIGTERM)
    pidfile.unlink(missing_ok=True)


def epilog(environ=os.environ) -> None:
    """On every node: stop the job's agent, lift stale network locks, clear what is left of
    job networks whose hpccr was killed (before the node takes the job's next run: it would
    find its part's address and VXLAN id taken); on the batch host: clean up after a run,
    record its checkpoints, and remove them once the job is done."""
    setup = _setup("epilog", environ)
    if setup is None:
        return
    job, cfg, log = setup
    state = scontrol_job(job.job_id)
    stop_agent(cfg, job)
    try:  # those of a checkpoint killed with its agent, of images removed since
        lifted = netlock.lift_stale()
    except HpccrError as exc:
        log(f"cannot lift stale network locks: {exc}")
    else:
        if lifted:
            log(f"lifted stale network locks {' '.join(lifted)}")
    try:
        cleared = netns.clear_leftovers()
    except (OSError, netlink.NetlinkError) as exc:
        log(f"cannot clear what is left of job networks: {exc}")
    else:
        if cleared:
            log(f"cleared what was left of job networks {' '.join(cleared)}")
    if other_batch_host(job, state):
        return
    job_dir = cfg.job_dir(job.user, job.job_id)
    try:
        with as_user(job.uid, job.gid):
            if not job_dir.is_dir():
                return
            message = _end_run(job, job_dir, state)
    except Exception as exc:  # whatever it is, never drain the node
        log(f"cannot clean up {job_dir}: {exc}")
        return
    log(f"{message} ({job_dir})")


def _end_run(job: SlurmJob, job_dir: Path, state: dict[str, str]) -> str:
    """As the job's user: the epilog's work on the job directory; returns the record line."""
    partials = jobdir.remove_partials(job_dir)
    record = Record(job_dir)
    started = record.started_run()
    run = job.restart_count if started is None else started
    restarts = max(job.restart_count, int(state.get("Restarts", 0)))
    requeued = restarts > run
    exit_code = state.get("ExitCode", job.exit_code)
    done = not requeued and started is not None and state.get("ExitCode") == "0:0"
    found = jobdir.checkpoints(job_dir)
    latest = jobdir.latest(job_dir)
    listing = ", ".join(c.describe() for c in found) or "none"
    if latest is not None:
        listing += f", latest -> {latest.name}"
    text = (f"run {run} ended: exit {exit_code}"
            + (f", requeued (restart count {restarts})" if requeued else "")
            + f"; checkpoints: {listing}; "
            + (f"cleaned up {', '.join(sorted(partials))}; " if partials else ""))
    if requeued:
        text += "kept for the restart"
    elif done or not found:
        shutil.rmtree(job_dir)
        return text + ("removed (job finished)" if found else "nothing to keep")
    else:
        text += "kept (the job did not complete successfully)"
    record.append(job.node, text)
    return text
