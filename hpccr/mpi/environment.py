"""What the MPI libraries need so that a job started by `hpccr run` can be checkpointed with all
its processes and restored on another node: settings put in the job's environment, each only
where the job's own environment does not set it.

- Open MPI keeps its session directory (PMIx's shared-memory data store, a debugger FIFO) in
  /tmp: files its processes hold and map, which the image would refer to by path, which mpirun
  removes when it ends and which another node does not have.  On a memory file system
  (/dev/shm) the image keeps their content, and a restore writes them back (fds/regular.py).
- In a one-node Slurm allocation, MPICH's hydra would start its proxies with srun, and Open
  MPI's mpirun, which no longer finds the allocation's node name as its own (the job has a host
  name of its own), would start a daemon there with srun: either way processes under
  slurmstepd, outside the job, where no checkpoint reaches them.  Hydra's fork launcher and Open
  MPI's isolated launcher, with the allocation's tasks as the local slots, keep every process in
  the job.  Jobs on several nodes are not changed (not checkpointable yet).
"""

from __future__ import annotations

from collections.abc import Mapping

OPEN_MPI_SESSION_DIR = "/dev/shm"


def job_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with what MPI jobs need added (what it sets itself wins)."""
    added = {"OMPI_MCA_orte_tmpdir_base": OPEN_MPI_SESSION_DIR}
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NUM_NODES", "1") == "1":
        added |= {"HYDRA_LAUNCHER": "fork", "OMPI_MCA_plm": "isolated",
                  "OMPI_MCA_ras": "^slurm"}
        tasks = env.get("SLURM_NTASKS") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0]
        if tasks.isdigit():
            added["OMPI_MCA_orte_set_default_slots"] = tasks
    return added | dict(env)
