"""MPI jobs on several nodes of the real cluster, given three nodes here: a job on two of them
is checkpointed as one whole (every node's part) and, after a requeue, restarted on another
pair, each part on the node at its slot, the node that held part 0 now holding part 1 or the
other way round (Open MPI and MPICH; an ordinary user's job and root's; ring.c and an mpi4py
program), or on all three nodes, the third one idle; a part lost in the middle of a
checkpoint leaves the previous one to restart from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hpccr_site import ended, log_lines, make_site, wait_for, write_script
from multinode import finalize_deadlock
from test_lifecycle import (
    MPI4PY,
    MPI_LAUNCH,
    RING_STEPS,
    ROOT_MPI,
    WORKLOADS,
    check_mpi_continued,
    checkpoints_taken,
    completed,
    mpi_lines,
)

from hpccr.image.series import Series

NODES = ("node1", "node2", "node3")
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def site(slurm_cluster):
    """The test site on three nodes."""
    yield from make_site(slurm_cluster, nodes=len(NODES))


def but(*nodes: str) -> str:
    """The node list of every node but `nodes`."""
    return ",".join(n for n in NODES if n not in nodes)


def slurm_list(pair: tuple[str, str]) -> str:
    """Two neighbouring nodes as Slurm writes them: node[1-2]."""
    return f"node[{pair[0].removeprefix('node')}-{pair[1].removeprefix('node')}]"


@pytest.fixture(scope="module")
def rings(site):
    """The rings for the cluster's jobs, by kind — ring.c built with Open MPI ("c"), ring.py
    with Open MPI's mpi4py ("mpi4py") and MPICH's ("mpich-mpi4py") where scripts/setup.sh
    built them: the name of their ranks' processes and the batch script's launch line (the
    launcher with no host list: hpccr gives it the allocation's)."""
    found = {}
    compiler, launch = MPI_LAUNCH["openmpi"]
    if shutil.which(compiler):
        program = site.cluster.job_dir / "ring-openmpi-nodes"
        subprocess.run([compiler, "-O2", "-o", program, WORKLOADS / "ring.c"], check=True,
                       capture_output=True)
        found["c"] = (program.name[:15], f"{launch} {program} {RING_STEPS}")
    for kind, mpi in (("mpi4py", "openmpi"), ("mpich-mpi4py", "mpich")):
        if shutil.which(MPI_LAUNCH[mpi][0]) and (MPI4PY / mpi / "mpi4py").is_dir():
            found[kind] = ("python3", f"{MPI_LAUNCH[mpi][1]} {PYTHON} {WORKLOADS / 'ring.py'} "
                                      f"{MPI4PY / mpi} {RING_STEPS}")
    if "c" not in found:
        pytest.skip("openmpi not installed")
    return found


def mpi_job_end(site, job: int, out: Path, kind: str) -> dict[str, str] | None:
    """The job's `scontrol show job` once it completed; None for an MPICH job that printed
    its result and then stayed in MPICH's own deadlock in MPI_Finalize (docs/slurm.md;
    multinode.finalize_deadlock), which is cancelled: it would run until its time limit."""
    c = site.cluster
    if not kind.startswith("mpich"):
        return completed(site, job, out, 300)
    binary = Path(PYTHON).resolve()  # what a rank's /proc/PID/exe names
    state = wait_for(lambda: (c.job(job)["JobState"] not in ("PENDING", "RUNNING")
                              or "DONE " in out.read_text() and finalize_deadlock(binary))
                     and c.job(job)["JobState"], 300, "the MPICH job to end")
    if state == "RUNNING":
        c.client("scancel", str(job))
        c.wait_state(job, ("CANCELLED", "COMPLETED", "FAILED"), 60)
        return None
    return completed(site, job, out, 120)


def printed_alone(line: str, user: str | None) -> list[str]:
    """What the ring prints when it runs on this machine, never interrupted."""
    runner = ["runuser", "-u", user, "--"] if user else []
    return mpi_lines(subprocess.run([*runner, "bash", "-c", line], capture_output=True,
                                    text=True, timeout=300, check=True,
                                    env={**os.environ, **({} if user else ROOT_MPI)}).stdout)


def submit_on(site, ring, name: str, nodes: tuple[str, str], user: str | None, **env) -> int:
    """The ring as a job on `nodes`, checkpointed every 2 s, its output in job_dir/name.out."""
    _, line = ring
    script = write_script(site, f"{name}.sh", f"#!/bin/bash\n{line}\n")
    return site.submit("--requeue", "--open-mode=append", "--checkpoint=0:02", "--nodes=2",
                       "--ntasks-per-node=2", f"--exclude={but(*nodes)}", "-o",
                       str(site.cluster.job_dir / f"{name}.out"), str(script), user=user,
                       **env, **({} if user else ROOT_MPI))


def check_restored(text: str, expected: list[str]) -> None:
    """The output of a run restored once continues the run (check_mpi_continued), and the
    restore did not start it over."""
    check_mpi_continued(text, expected)
    assert len(mpi_lines(text.partition("restoring")[2])) < len(expected), \
        f"started over:\n{text}"


@pytest.mark.parametrize("how, user, kind, first, then", [
    ("requeue", "hpcuser", "mpi4py", ("node2", "node3"), ("node1", "node2")),
    ("usr1", None, "c", ("node1", "node2"), ("node2", "node3")),
    ("usr1", "hpcuser", "mpich-mpi4py", ("node2", "node3"), ("node1", "node2")),
])
def test_mpi_job_restarts_on_another_pair_of_nodes(site, jobs, rings, how, user, kind, first,
                                                   then):
    """An MPI job on two nodes (2 ranks on each, `mpirun` or `mpiexec` with no host list:
    hpccr gives it the allocation's), checkpointed every 2 s as one whole (both nodes' parts),
    stopped — requeued by the operator (an ordinary user's job, ring.py with Open MPI's
    mpi4py: it restarts from its latest periodic checkpoint), or warned with USR1 (root's job,
    ring.c with Open MPI, or an ordinary user's, ring.py with MPICH's mpi4py: one final
    checkpoint of both parts, and hpccr requeues it) — and restarted, while held, on another
    pair of nodes: each part restored on the node at its slot, it ends with exactly what a run
    never interrupted prints.  The remote ranks and their orted or hydra proxy are in the job's
    part at slot 1, started through hpccr's launcher, not srun."""
    c = site.cluster
    if kind not in rings:
        pytest.skip(f"no {kind} ring (scripts/setup.sh installs MPICH and builds mpi4py)")
    ring = rings[kind]
    comm, line = ring
    reference = printed_alone(line, user)
    name = f"mpi-two-nodes-{how}-{kind}"  # one output file per case: a user cannot append to root's
    out = c.job_dir / f"{name}.out"
    job = submit_on(site, ring, name, first, user)
    jobs.append(job)
    owner = user or "root"
    assert c.wait_state(job, "RUNNING", 30)["NodeList"] == slurm_list(first)
    try:
        wait_for(lambda: checkpoints_taken(site, job, owner) >= 2, 120,
                 "two coordinated checkpoints")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; output:\n{out.read_text() if out.exists() else ''}") \
            from None
    latest = (site.job_dir(owner, job) / "latest").resolve()
    assert sorted(p.name for p in latest.glob("part-*")) == ["part-0", "part-1"], latest
    remote = json.loads((latest / "part-1" / "image.json").read_text())["processes"]
    assert [p["comm"] for p in remote].count(comm) == 2, remote
    shown = subprocess.run([sys.executable, "-m", "hpccr", "show", latest], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for said in (f"{latest}: a job on 2 nodes", "coordinated commit_s ", "=== part-1 ===",
                 f"host name job{job}-1; part at slot 1 of a job on 2 nodes"):
        assert said in shown.stdout, (said, shown.stdout)
    # A requeued job starts again once cred_expire has passed: held before that, it is given
    # the other pair, then let go.
    if how == "requeue":
        c.scontrol("requeuehold", str(job))
    else:
        c.client("scancel", "--batch", "--signal=USR1", str(job))
        assert c.wait_state(job, "PENDING", 60)["Restarts"] == "1"
        c.scontrol("hold", str(job))
    assert c.wait_state(job, "PENDING", 60)["Restarts"] == "1"
    ended(site, job)
    c.scontrol("update", f"JobId={job}", f"ExcNodeList={but(*then)}")
    c.scontrol("release", str(job))
    info = mpi_job_end(site, job, out, kind)
    text = out.read_text()
    assert info is None or info["ExitCode"] == "0:0", text
    assert c.job(job)["NodeList"] == slurm_list(then), c.job(job)
    if how == "usr1":
        assert re.search(rf"hpccr: job {job} requeued; it goes on from its checkpoint", text), text
    check_restored(text, reference)


def test_part_lost_in_a_checkpoint(site, jobs, rings):
    """Root's Open MPI job on node1 and node2 whose part at slot 1 loses its hpccr in the middle
    of the second coordinated checkpoint, that part frozen (HPCCR_FAULT, in the first run
    only): the checkpoint is abandoned, nothing of it is left, ckpt-0001 stays latest.  Slurm
    ends the step of the lost part, and the ranks there with it: the job fails (by MPI's own
    means, or ended by the batch step, which sees that step end badly, when the lost ranks'
    end reached no peer: their connections were locked then).  Requeued, it restarts from
    ckpt-0001 on both nodes and ends with exactly the output of a run never interrupted."""
    c = site.cluster
    ring = rings["c"]
    reference = printed_alone(ring[1], None)
    out = c.job_dir / "mpi-part-lost.out"
    job = submit_on(site, ring, "mpi-part-lost", ("node1", "node2"), None,
                    HPCCR_FAULT="part-frozen:2@0")
    jobs.append(job)
    info = c.wait_state(job, ("FAILED", "COMPLETED", "CANCELLED"), 180)
    text = out.read_text() if out.exists() else ""
    assert info["JobState"] == "FAILED", (info, text)
    # Failed by MPI's own means (mpirun lost its daemon) or, when the lost ranks' end reached
    # no peer, by hpccr ("lost its part on another node"): which one comes first varies.
    series = site.job_dir("root", job)
    assert Series(series).latest().name == "ckpt-0001", text
    assert not (series / "ckpt-0002").exists(), text
    ended(site, job)
    # Requeued, it may start again at once on both nodes, where the lost part's network
    # namespace may still live on (its closing connections' peers are gone): the epilog has
    # removed what was left of it there, so the restored part has its own link and VXLAN id,
    # and nothing its peers send reaches the old namespace (which would reset them).
    c.scontrol("requeue", str(job))
    info = completed(site, job, out, 300)
    text = out.read_text()
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "node[1-2]", (info, text)
    assert "is taken on this node" not in text and "waiting for the job's VXLAN id" not in text
    check_restored(text, reference)


def test_restart_on_more_nodes(site, jobs, rings):
    """Root's Open MPI job on node2 and node3, requeued by the operator after two coordinated
    checkpoints and given all three nodes: its two parts are restored on the first two nodes
    of the new allocation (node1 and node2), the third node has no part to restore and says so,
    and the job ends with exactly the output of a run never interrupted."""
    c = site.cluster
    ring = rings["c"]
    reference = printed_alone(ring[1], None)
    out = c.job_dir / "mpi-more-nodes.out"
    job = submit_on(site, ring, "mpi-more-nodes", ("node2", "node3"), None)
    jobs.append(job)
    wait_for(lambda: checkpoints_taken(site, job, "root") >= 2, 120,
             "two coordinated checkpoints")
    c.scontrol("requeuehold", str(job))
    assert c.wait_state(job, "PENDING", 60)["Restarts"] == "1"
    ended(site, job)
    latest = Series(site.job_dir("root", job)).latest()
    c.scontrol("update", f"JobId={job}", "ExcNodeList=")
    c.scontrol("update", f"JobId={job}", "NumNodes=3-3", "NumTasks=6")
    c.scontrol("release", str(job))
    info = completed(site, job, out, 300)
    text = out.read_text()
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "node[1-3]", (info, text)
    assert f"{latest} has no part for node3 (slot 2)" in text, text
    check_restored(text, reference)


def test_restart_on_fewer_nodes_is_refused(site, jobs, rings):
    """Root's Open MPI job on node1 and node2, requeued by the operator after a coordinated
    checkpoint and given one node: it cannot run on fewer nodes than its checkpoint has parts,
    so the restart fails saying so in the job's output — never started over — and the
    checkpoints are kept for a restart on two nodes."""
    c = site.cluster
    out = c.job_dir / "mpi-fewer-nodes.out"
    job = submit_on(site, rings["c"], "mpi-fewer-nodes", ("node1", "node2"), None)
    jobs.append(job)
    wait_for(lambda: checkpoints_taken(site, job, "root") >= 1, 120, "a coordinated checkpoint")
    c.scontrol("requeuehold", str(job))
    assert c.wait_state(job, "PENDING", 60)["Restarts"] == "1"
    ended(site, job)
    latest = Series(site.job_dir("root", job)).latest()
    c.scontrol("update", f"JobId={job}", "NumNodes=1-1", "NumTasks=2", "NumCPUs=2")
    c.scontrol("release", str(job))
    info = c.wait_state(job, ("FAILED", "COMPLETED", "CANCELLED"), 120)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["NodeList"] in ("node1", "node2"), (info, text)
    assert f"restoring {latest} failed, the checkpoints are kept" in text, text
    assert (f"{latest} is a checkpoint of a job on 2 nodes, restored here as a job on one node "
            "(no HPCCR_NODE_SLOT): a job cannot run on fewer nodes than it was checkpointed "
            "on") in text, text
    assert len(mpi_lines(text.partition("restoring")[2])) == 0, text  # not started over
    second_run = wait_for(lambda: [line for line in log_lines(site, job) if " ended: " in line][1:],
                          what="the epilog of the job's second run")[0]
    assert "kept" in second_run and Series(site.job_dir("root", job)).latest() == latest
