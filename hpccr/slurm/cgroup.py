"""Slurm jobs' cgroups: a job hpccr starts or restores for a Slurm job must live in that job's
cgroups (limits, accounting, freezing, and the clean-up that kills whatever is left when the
job ends), whoever started it, and only a process of the job may ask for it.

Slurm's cgroup plugins name a job's cgroup `job_<id>`: `<controller>/slurm[_<node>]/uid_<uid>/
job_<id>/` with cgroup v1, `.../slurmstepd.scope/job_<id>/` with v2."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
JOB_PATTERNS = ("*/slurm*/uid_*/job_{id}", "system.slice/slurmstepd.scope/job_{id}",
                "unified/system.slice/slurmstepd.scope/job_{id}")


def _mounts() -> list[tuple[set[str], str, Path]]:
    """(super options, file system type, mount point) of the cgroup hierarchies mounted whole."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if fstype in ("cgroup", "cgroup2") and fields[3] == "/":
                found.append((set(options.split(",")), fstype, Path(fields[4])))
    return found


def hierarchies(pid: int) -> list[Path]:
    """The cgroup directories process `pid` is in, one per mounted hierarchy."""
    mounts = _mounts()
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            wanted = set(controllers.split(",")) if controllers else set()
            for options, fstype, mountpoint in mounts:
                if (fstype == "cgroup2") == (not controllers) and wanted <= options:
                    dirs.append(mountpoint / path.lstrip("/"))
                    break
    return dirs


def join(pid: int) -> None:
    """Move this process into every cgroup of process `pid` (raises OSError if one fails)."""
    own = set(hierarchies(os.getpid()))
    for directory in hierarchies(pid):
        if directory not in own:
            (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")


def job_has_cgroups(job_id: str) -> bool:
    """Does Slurm keep job `job_id` in cgroups of its own on this node?"""
    return any(any(CGROUP_ROOT.glob(p.format(id=job_id))) for p in JOB_PATTERNS)


def in_job(pid: int, job_id: str) -> bool:
    """Is process `pid` in one of job `job_id`'s cgroups?"""
    with open(f"/proc/{pid}/cgroup") as f:
        return any(f"/job_{job_id}/" in line.rstrip("\n") + "/" for line in f)
