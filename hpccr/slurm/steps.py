"""Job steps started with `srun` from inside a checkpointed job: their tasks run under
slurmstepd, outside the job, where no checkpoint reaches them, and srun holds connections to
Slurm's daemons that a restore could not bring back.  A checkpoint taken while one runs is
refused (the job runs on, and its output says why)."""

from __future__ import annotations

import os

from hpccr.engine import procfs, tree
from hpccr.errors import UnsupportedResource

LAUNCHERS = ("srun",)


def refuse_running_steps(root: int) -> None:
    """Raise UnsupportedResource if a process of the job under `root` is running a step."""
    pending, seen = [root], set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            name = os.path.basename(os.readlink(procfs.path(pid, "exe")))
            pending += tree.children(pid)
        except OSError:
            continue  # gone, or a zombie
        if name in LAUNCHERS:
            raise UnsupportedResource(
                f"process {pid} ({name}) is running a Slurm job step, whose tasks run under "
                "slurmstepd outside the job: a job cannot be checkpointed while a step runs")
