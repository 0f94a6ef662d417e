"""MPI jobs on two nodes, with both MPIs: the launcher (mpiexec, mpirun) and two ranks in the
job's part on one node, and the other two ranks, with their hydra proxy or orted, in its part
on the other node, started there through hpccr-launch and that part's launch server
(hpccr/mpi/launch.py) instead of ssh; the ranks talk TCP over the job's overlay.  Both parts
dumped and killed in the middle of the run and restored on each other's node: the run prints
exactly the steps and result of a run never interrupted.

Nodes made of namespaces (multinode.py); workload: workloads/mpi/ring.c.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import TIMEOUT, describe, wait_until
from multinode import part_env
from test_mpi import RING, printed

STEPS, BYTES, DUMP_AFTER = 300, 1 << 20, 40
ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
LAUNCH_SERVER = [str(Path(sys.executable).with_name("hpccr-launch")), "--serve"]
MPIS = {  # compiler, launcher and its options, then how to place 2 ranks on each of 2 hosts
    "mpich": ("mpicc.mpich", ["mpiexec.mpich", "-n", "4"], "-hosts", "{}:2,{}:2"),
    "openmpi": ("mpicc.openmpi", ["mpirun.openmpi", "--oversubscribe", "-np", "4"], "-host",
                "{}:2,{}:2"),
}


@pytest.fixture(scope="module", params=sorted(MPIS))
def mpi(request, tmp_path_factory):
    """The MPI's launcher for 4 ranks on two hosts (a function of their names), the ring
    built with its mpicc, and what a run on this node never interrupted prints."""
    compiler, launcher, option, hosts = MPIS[request.param]
    missing = [p for p in (compiler, launcher[0]) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{request.param} not installed ({' '.join(missing)}); run scripts/setup.sh")
    binary = tmp_path_factory.mktemp(request.param) / "ring"
    subprocess.run([compiler, "-O2", "-Wall", "-o", binary, RING], check=True,
                   capture_output=True)
    command = [str(binary), str(STEPS), str(BYTES)]
    res = subprocess.run([*launcher, *command], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=4 * TIMEOUT, env={**os.environ, **ROOT})
    assert res.returncode == 0, describe(res)
    return (lambda a, b: [*launcher, option, hosts.format(a, b), *command],
            printed(res.stdout.splitlines()))


def test_mpi_job_restored_on_each_others_node(tree_cr, nodes, tmp_path, mpi):
    run_on, reference = mpi
    job_id = random.randrange(1, 1 << 20)
    server = tree_cr.start_job(LAUNCH_SERVER, wrap=nodes.wrap(1),
                               env={**part_env(job_id, 1, nodes.addresses), **ROOT})
    ranks = tree_cr.start_job(run_on(f"job{job_id}-0", f"job{job_id}-1"), ready=False,
                              wrap=nodes.wrap(0),
                              env={**part_env(job_id, 0, nodes.addresses), **ROOT})
    wait_until(lambda: len(ranks.values("STEP")) >= DUMP_AFTER or ranks.proc.poll() is not None,
               f"{DUMP_AFTER} steps of the MPI job", 4 * TIMEOUT)
    assert ranks.proc.poll() is None, ranks.output() + server.output()
    tree_cr.dump_and_kill(ranks, tmp_path / "ranks")
    tree_cr.dump_and_kill(server, tmp_path / "server")
    for part in ("ranks", "server"):  # two ranks in each part: the remote ones in the job too
        processes = json.loads((tmp_path / part / "image.json").read_text())["processes"]
        assert [p["comm"] for p in processes].count("ring") == 2, processes
    swapped = nodes.addresses[::-1]
    restored = {
        image: tree_cr.start_restore(tmp_path / image, wrap=nodes.wrap(node),
                                     env=part_env(job_id, slot, swapped))[0]
        for image, slot, node in (("server", 1, 0), ("ranks", 0, 1))
    }
    assert restored["ranks"].wait(timeout=4 * TIMEOUT) == 0, \
        restored["ranks"].stderr.read() + ranks.output()
    assert printed(ranks.lines()) == reference, ranks.output()
    assert restored["server"].poll() is None, restored["server"].stderr.read()
