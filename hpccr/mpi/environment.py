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
  the job.
- In a part of a job on several nodes (hpccr/engine/overlay.py), both start their daemons on
  the other parts' nodes with hpccr-launch (hpccr/mpi/launch.py) instead of ssh or srun, and
  Open MPI talks over the job's overlay device only.  HPCCR_JOB_HOSTS names the parts' hosts
  (for `mpirun -host` / `mpiexec -hosts`); in a Slurm allocation, Open MPI's default hosts are
  the parts' hosts with the allocation's tasks per node as their slots, so that a bare `mpirun`
  places its ranks as it would under Slurm.
"""

from __future__ import annotations

from collections.abc import Mapping

from hpccr.engine import overlay
from hpccr.mpi import launch

OPEN_MPI_SESSION_DIR = "/dev/shm"


def job_environment(env: Mapping[str, str], hosts: tuple[str, ...] = ()) -> dict[str, str]:
    """`env` with what MPI jobs need added (what it sets itself wins); `hosts`: the host names
    of every part of a job on several nodes."""
    added = {"OMPI_MCA_orte_tmpdir_base": OPEN_MPI_SESSION_DIR}
    if len(hosts) > 1:
        launcher = launch.executable()
        added |= {"OMPI_MCA_plm": "rsh", "OMPI_MCA_plm_rsh_agent": launcher,
                  "OMPI_MCA_ras": "^slurm", "OMPI_MCA_btl_tcp_if_include": overlay.DEVICE,
                  "OMPI_MCA_oob_tcp_if_include": overlay.DEVICE,
                  "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": launcher,
                  launch.JOB_HOSTS: ",".join(hosts)}
        slots = tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""))
        if len(slots) == len(hosts):
            added["OMPI_MCA_orte_default_dash_host"] = ",".join(
                f"{host}:{n}" for host, n in zip(hosts, slots, strict=True))
        return added | dict(env)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NUM_NODES", "1") == "1":
        added |= {"HYDRA_LAUNCHER": "fork", "OMPI_MCA_plm": "isolated",
                  "OMPI_MCA_ras": "^slurm"}
        tasks = env.get("SLURM_NTASKS") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0]
        if tasks.isdigit():
            added["OMPI_MCA_orte_set_default_slots"] = tasks
    return added | dict(env)


def tasks_per_node(text: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE ("2(x3),1") as a count per node ([2, 2, 2, 1]); [] if it
    cannot be read."""
    counts = []
    for item in filter(None, text.split(",")):
        count, _, times = item.partition("(x")
        if not count.isdigit() or times and not times.rstrip(")").isdigit():
            return []
        counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return counts
