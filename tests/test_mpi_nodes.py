"""MPI jobs on two nodes, with both MPIs: the launcher (mpiexec, mpirun) and two ranks in the
job's part on one node, and the other two ranks, with their hydra proxy or orted, in its part
on the other node, started there through hpccr-launch and that part's launch server
(hpccr/mpi/launch.py) instead of ssh; the ranks talk TCP over the job's overlay.  Both parts
dumped and killed in the middle of the run and restored on each other's node, or checkpointed
together every 2 s (hpccr/mpi/coordinate.py) and restored after both were killed: the run prints
exactly the steps and result of a run never interrupted.  A member's hpccr killed in the middle
of a coordinated checkpoint leaves the previous one latest.  A checkpoint that caught a 64 MiB
message on its way between the nodes restores.  An MPICH job may deadlock in MPI_Finalize after
its work is done, by a bug of MPICH's own (see `job_end`).

Nodes made of namespaces (multinode.py); workload: workloads/mpi/ring.c.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import TIMEOUT, describe, wait_until
from multinode import finalize_deadlock, part_env
from test_mpi import RING, printed

from hpccr.image.series import Series

STEPS, BYTES, DUMP_AFTER = 300, 1 << 20, 40
ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
LAUNCH_SERVER = [str(Path(sys.executable).with_name("hpccr-launch")), "--serve"]
MPIS = {  # compiler, launcher and its options, then how to place 2 ranks on each of 2 hosts
    "mpich": ("mpicc.mpich", ["mpiexec.mpich", "-n", "4"], "-hosts", "{}:2,{}:2"),
    "openmpi": ("mpicc.openmpi", ["mpirun.openmpi", "--oversubscribe", "-np", "4"], "-host",
                "{}:2,{}:2"),
}


@dataclass
class Ring:
    """The ring of one MPI (built with its mpicc) and its launcher for 4 ranks."""
    name: str
    binary: Path
    launcher: list[str]
    option: str  # the launcher's option for the hosts, and their list for 2 ranks on each
    hosts: str

    def on(self, a: str, b: str, **run) -> list[str]:
        """The launcher's command for 2 ranks on each of the hosts `a` and `b`, the ring's
        arguments `run` (ring_args)."""
        return [*self.launcher, self.option, self.hosts.format(a, b), str(self.binary),
                *ring_args(**run)]

    def printed(self, **run) -> list[str]:
        """What a run on this node, never interrupted, prints."""
        res = subprocess.run([*self.launcher, str(self.binary), *ring_args(**run)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=4 * TIMEOUT, env={**os.environ, **ROOT})
        assert res.returncode == 0, describe(res)
        return printed(res.stdout.splitlines())


def ring_args(steps: int = STEPS, size: int = BYTES, hold_ms: int = 0) -> list[str]:
    """The ring's arguments (workloads/mpi/ring.c)."""
    return [str(steps), str(size), *([str(hold_ms)] if hold_ms else [])]


@pytest.fixture(scope="module", params=sorted(MPIS))
def mpi(request, tmp_path_factory):
    """The ring of each MPI, and what its run of STEPS steps of BYTES prints."""
    compiler, launcher, option, hosts = MPIS[request.param]
    missing = [p for p in (compiler, launcher[0]) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{request.param} not installed ({' '.join(missing)}); run scripts/setup.sh")
    binary = tmp_path_factory.mktemp(request.param) / "ring"
    subprocess.run([compiler, "-O2", "-Wall", "-o", binary, RING], check=True,
                   capture_output=True)
    ring = Ring(request.param, binary, launcher, option, hosts)
    return ring, ring.printed()


def job_end(ring: Ring, proc: subprocess.Popen, lines, *others: subprocess.Popen) -> int | None:
    """The exit status of `proc`, the hpccr that runs or restores the MPI job's launcher, once
    it (or one of `others`) has ended.  None for an MPICH job that printed its result (its DONE
    line: the work is complete) and then stays in MPICH's own deadlock in MPI_Finalize, not
    hpccr's doing (docs/slurm.md); the caller checks the output, the harness ends the job."""
    def over() -> bool:
        return (any(p.poll() is not None for p in (proc, *others))
                or ring.name == "mpich" and any(line.startswith("DONE ") for line in lines())
                and finalize_deadlock(ring.binary))

    wait_until(over, "the MPI job to end", 4 * TIMEOUT)
    if any(p.poll() is not None for p in others):
        return proc.poll()
    try:  # the deadlock's signature seen: a job that still ends was not in it
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None


def test_mpi_job_on_two_nodes(tree_cr, nodes, tmp_path, mpi):
    """Without checkpoints: the run on two nodes prints what the run on one node prints, and
    ends."""
    ring, reference = mpi
    job_id = random.randrange(1, 1 << 20)
    tree_cr.start_job(LAUNCH_SERVER, wrap=nodes.wrap(1),
                      env={**part_env(job_id, 1, nodes.addresses), **ROOT})
    ranks = tree_cr.start_job(ring.on(f"job{job_id}-0", f"job{job_id}-1"), ready=False,
                              wrap=nodes.wrap(0),
                              env={**part_env(job_id, 0, nodes.addresses), **ROOT})
    assert job_end(ring, ranks.proc, ranks.lines) in (0, None), ranks.output()
    assert printed(ranks.lines()) == reference, ranks.output()


def test_mpi_job_restored_on_each_others_node(tree_cr, nodes, tmp_path, mpi):
    ring, reference = mpi
    job_id = random.randrange(1, 1 << 20)
    server = tree_cr.start_job(LAUNCH_SERVER, wrap=nodes.wrap(1),
                               env={**part_env(job_id, 1, nodes.addresses), **ROOT})
    ranks = tree_cr.start_job(ring.on(f"job{job_id}-0", f"job{job_id}-1"), ready=False,
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
    status = job_end(ring, restored["ranks"], ranks.lines, restored["server"])
    assert restored["server"].poll() is None, restored["server"].stderr.read()
    assert status in (0, None), restored["ranks"].stderr.read() + ranks.output()
    assert printed(ranks.lines()) == reference, ranks.output()
    assert restored["server"].poll() is None, restored["server"].stderr.read()


def start_parts(tree_cr, nodes, ring, job_id, series, member_env=None, **run):
    """The job's parts with checkpoints every 2 s into `series` (by the part at slot 0): the
    launch server at slot 1, the MPI job (`ring.on` with `run`'s steps and size) at slot 0."""
    server = tree_cr.start_job(LAUNCH_SERVER, "-D", series, wrap=nodes.wrap(1),
                               env={**part_env(job_id, 1, nodes.addresses), **ROOT,
                                    **(member_env or {})})
    ranks = tree_cr.start_job(ring.on(f"job{job_id}-0", f"job{job_id}-1", **run), "-D", series,
                              "--interval", "2s", ready=False, wrap=nodes.wrap(0),
                              env={**part_env(job_id, 0, nodes.addresses), **ROOT})
    return server, ranks


def kill_parts(*parts):
    """Every part killed at once, as by a failure of their nodes."""
    for part in parts:
        os.kill(part.pid, signal.SIGKILL)  # the part's pid 1: the whole part goes
    for part in parts:
        part.proc.wait(timeout=TIMEOUT)


def restore_swapped(tree_cr, nodes, series, job_id, ring, ranks, reference):
    """Both parts of the latest checkpoint restored on each other's node; the run ends with
    the steps after the checkpoint printed again, the same as a run never interrupted."""
    before = printed(ranks.lines())
    swapped = nodes.addresses[::-1]
    restored = {
        part: tree_cr.start_restore(series, wrap=nodes.wrap(node),
                                    env=part_env(job_id, slot, swapped))[0]
        for part, slot, node in (("server", 1, 0), ("ranks", 0, 1))
    }
    status = job_end(ring, restored["ranks"], ranks.lines, restored["server"])
    assert restored["server"].poll() is None, restored["server"].stderr.read()
    assert status in (0, None), restored["ranks"].stderr.read() + ranks.output()
    again = printed(ranks.lines())[len(before):]
    assert before == reference[:len(before)], ranks.output()
    assert again == reference[len(reference) - len(again):], ranks.output()
    assert len(reference) - len(again) <= len(before), "steps were skipped"


def test_coordinated_checkpoints(tree_cr, nodes, tmp_path, mpi):
    """Checkpoints every 2 s of both parts as one (hpccr/mpi/coordinate.py) while the job runs
    on, with the freeze skew measured; then both parts killed, as by a node failure: the latest
    checkpoint, one image per part, restores on the nodes swapped and finishes the run."""
    ring, reference = mpi
    job_id = random.randrange(1, 1 << 20)
    series = tmp_path / "series"
    server, ranks = start_parts(tree_cr, nodes, ring, job_id, series)
    wait_until(lambda: (series / "latest").exists() or ranks.proc.poll() is not None,
               "a coordinated checkpoint", 4 * TIMEOUT)
    assert ranks.proc.poll() is None, ranks.output() + server.output()
    latest = Series(series).latest()
    assert sorted(p.name for p in latest.iterdir()) == ["coordination.json", "part-0", "part-1"]
    figures = json.loads((latest / "coordination.json").read_text())
    assert figures["parts"] == 2 and figures["freeze_skew_s"] >= 0, figures
    kill_parts(ranks, server)
    restore_swapped(tree_cr, nodes, series, job_id, ring, ranks, reference)


def test_member_killed_in_a_checkpoint(tree_cr, nodes, tmp_path, mpi):
    """The hpccr of the part at slot 1 killed in the middle of the second checkpoint, its part
    frozen: the checkpoint is abandoned, nothing of it left, the first one still latest, and
    the job runs on; killed, the job restores from that first checkpoint."""
    ring, reference = mpi
    job_id = random.randrange(1, 1 << 20)
    series = tmp_path / "series"
    server, ranks = start_parts(tree_cr, nodes, ring, job_id, series,
                                member_env={"HPCCR_FAULT": "part-frozen:2"})
    wait_until(lambda: server.proc.poll() is not None or ranks.proc.poll() is not None,
               "the member's hpccr to be killed", 4 * TIMEOUT)
    wait_until(lambda: "failed, the job runs on" in ranks.output() or ranks.proc.poll() is not None,
               "the coordinator to abandon the checkpoint", 4 * TIMEOUT)
    assert ranks.proc.poll() is None, ranks.output()
    assert Series(series).latest().name == "ckpt-0001"
    assert not (series / "ckpt-0002").exists()
    steps = len(printed(ranks.lines()))
    wait_until(lambda: len(printed(ranks.lines())) > steps + 5, "the job to run on")
    kill_parts(ranks, server)
    restore_swapped(tree_cr, nodes, series, job_id, ring, ranks, reference)


def queued(checkpoint: Path) -> int:
    """Bytes in the send and receive queues of the TCP connections of a checkpoint's parts."""
    return sum(f.stat().st_size for f in checkpoint.glob("part-*/tcp-*.img"))


def test_checkpoint_with_a_large_message_in_flight(tree_cr, nodes, tmp_path, mpi):
    """64 MiB messages between the nodes every step, held in flight for 100 ms of each step
    (ring.c's HOLD_MS): checkpoints every 2 s until one catches more than 1 MiB in the queues
    of the job's connections (a message on its way between the nodes; what the queues cannot
    hold is still in the sender's memory, as MPI's progress left it); both parts killed, that
    checkpoint restored on the nodes swapped: the run prints what a run never interrupted
    prints.  Without the hold, a checkpoint caught a message in flight only by chance: a run
    of 60 steps once ended with none caught."""
    ring, _ = mpi
    run = {"steps": 60, "size": 64 << 20, "hold_ms": 100}
    reference = ring.printed(**run)
    job_id = random.randrange(1, 1 << 20)
    series = tmp_path / "series"
    server, ranks = start_parts(tree_cr, nodes, ring, job_id, series, **run)
    caught = []

    def in_flight() -> bool:
        latest = Series(series).latest()
        if latest is not None and queued(latest) > 1 << 20:
            caught.append(latest)
        return bool(caught) or ranks.proc.poll() is not None

    wait_until(in_flight, "a checkpoint with a large message in flight", 4 * TIMEOUT)
    assert ranks.proc.poll() is None, ranks.output() + server.output()
    kill_parts(ranks, server)
    restore_swapped(tree_cr, nodes, caught[0], job_id, ring, ranks, reference)
