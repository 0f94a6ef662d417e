"""`hpccr slurm job`: the batch script of a checkpointed job, run under `hpccr run`.

Both ways into checkpointing end here: the SPANK plugin puts etc/slurm/job.sh in place of the
batch script, and `hpccr sbatch` submits a wrapper script; each runs
`hpccr slurm job -- SCRIPT ARGS` as the batch step's top process, in the job's cgroup.

This process stays in the foreground for the whole job: it runs the job_start hooks, starts
`hpccr run -D <checkpoint dir> --interval <interval> -- SCRIPT ARGS` as its child, passes every
signal Slurm sends the batch shell on to it, and, once the job ended, runs the job_end hooks and
exits with the job's status.  The lifecycle (a final checkpoint on USR1/TERM, then
`scontrol requeue`; on a restart, restore from the newest checkpoint instead of starting over)
belongs in `Supervisor`: it already owns the child and the signals.

A job that cannot be checkpointed still runs: when its checkpoint directory cannot be made or
`hpccr run` cannot start it (for now `hpccr run` needs root), the script runs directly and one
warning on stderr says why.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hpccr import config
from hpccr.config import ConfigError
from hpccr.engine.job import FORWARDED
from hpccr.slurm.hooks import run_hooks


def warn(message: str) -> None:
    print(f"hpccr: {message}", file=sys.stderr, flush=True)


def default_dir(cfg: config.Config) -> Path:
    """<checkpoint_base>/<user>/<jobid> for the Slurm job this runs in."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ValueError("not inside a Slurm job (SLURM_JOB_ID not set) and no --checkpoint-dir")
    return cfg.job_dir(pwd.getpwuid(os.getuid()).pw_name, job_id)


class Supervisor:
    """Runs one child to its end, passing on the signals the batch shell receives."""

    def __init__(self, argv: list[str]):
        self.child = subprocess.Popen(argv)
        self.previous = {sig: signal.signal(sig, self.forward) for sig in FORWARDED}

    def forward(self, signo: int, _frame) -> None:
        if self.child.returncode is None:
            self.child.send_signal(signo)

    def wait(self) -> int:
        """The child's exit status, 128+N when it was killed by signal N (like a shell)."""
        try:
            status = self.child.wait()
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status


def run_job(command: list[str], interval: int | None, directory: str | None) -> int:
    """Run the job script under hpccr (or directly, when it cannot be); returns its status."""
    try:
        cfg = config.load()
        series = Path(directory).absolute() if directory else default_dir(cfg)
        series.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (ConfigError, ValueError, OSError) as exc:
        cfg = series = None
        warn(f"job {os.environ.get('SLURM_JOB_ID', '?')} runs without checkpoints: {exc}")
    if series is not None:
        os.environ["HPCCR_CHECKPOINT_DIR"] = str(series)
    if interval:
        os.environ["HPCCR_CHECKPOINT_INTERVAL"] = f"{interval}s"
    run_hooks("job_start", command=command, interval=interval)
    status = None
    if series is not None:
        status = _under_hpccr(command, series, interval, cfg.keep)
    if status is None:
        status = Supervisor(command).wait()
    run_hooks("job_end", exit_code=status)
    return status


def _under_hpccr(command: list[str], series: Path, interval: int | None,
                 keep: int) -> int | None:
    """The job's status under `hpccr run`, or None if `hpccr run` could not start it."""
    with tempfile.TemporaryDirectory(prefix="hpccr-job-") as tmp:
        pidfile = Path(tmp) / "pid"
        argv = [sys.executable, "-m", "hpccr", "run", "-D", str(series), "--keep", str(keep),
                "--pidfile", str(pidfile)]
        if interval:
            argv += ["--interval", f"{interval}s"]
        status = Supervisor([*argv, "--", *command]).wait()
        if pidfile.exists():
            return status
    warn(f"job {os.environ.get('SLURM_JOB_ID', '?')} runs without checkpoints: "
         "`hpccr run` could not start it (its error is above)")
    return None
