"""End-to-end checks of the Slurm test cluster: real daemons, jobs as an ordinary user."""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

from testbed.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
DAEMON_NAMES = {"munged", "slurmctld", "slurmd", "slurmstepd"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cluster", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def live_daemons() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm in DAEMON_NAMES and state != "Z":  # pid 1 here leaves zombies unreaped
            out.append(f"{comm}[{pid}]")
    return out


def assert_torn_down(cluster: Cluster) -> None:
    assert glob.glob("/run/netns/hpccr-*") == []
    assert glob.glob("/sys/class/net/hpccr-*") == []
    assert glob.glob("/sys/fs/cgroup/*/slurm_node*") == []
    assert live_daemons() == []
    assert sorted(p.name for p in cluster.dir.iterdir()) == ["log"]


def run_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("run ")]


def test_conf_extra_lines_override_or_append(tmp_path):
    c = Cluster(tmp_path, nodes=3, extra_conf=["KillWait=60", "Prolog=/opt/p/prolog",
                                               "PlugStackConfig=/opt/p/plugstack.conf"])
    conf = c.slurm_conf().splitlines()
    assert "KillWait=60" in conf and "KillWait=30" not in conf
    assert "Prolog=/opt/p/prolog" in conf and "PlugStackConfig=/opt/p/plugstack.conf" in conf
    assert f"AuthInfo=socket={tmp_path}/munge/munge.socket,cred_expire=10" in conf
    nodes = [line.split()[:3] for line in conf if line.startswith("NodeName=")]
    assert nodes == [[f"NodeName=node{i}", f"NodeHostname=node{i}", f"NodeAddr=10.213.7.1{i}"]
                     for i in (1, 2, 3)]


def test_nodes_idle_and_up_is_idempotent(slurm_cluster):
    c = slurm_cluster
    c.wait_ready(30)
    states = {tuple(line.split()) for line in c.sinfo("-h", "-N", "-o", "%N %T").splitlines()}
    assert states == {("node1", "idle"), ("node2", "idle")}
    pids = c.daemons()
    c.up()
    assert c.daemons() == pids
    status = cli("status", "--dir", str(c.dir))
    assert status.returncode == 0, status.stderr
    assert f"logs: {c.log_dir}" in status.stdout


def test_config_partitions_and_preemption(slurm_cluster):
    c = slurm_cluster
    conf = c.scontrol("show", "config")
    for want in ("ProctrackType           = proctrack/cgroup",
                 "PreemptType             = preempt/partition_prio",
                 "PreemptMode             = REQUEUE", "JobRequeue              = 1",
                 "SlurmctldPort           = 26817", "SlurmdPort              = 26818"):
        assert want in conf
    assert "PriorityTier=10" in c.scontrol("show", "partition", "urgent")
    assert "Default=YES" in c.scontrol("show", "partition", "batch")

    low = c.sbatch(None, "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "exec sleep 300")
    try:
        c.wait_state(low, "RUNNING", 30)
        out = c.job_dir / "urgent.out"
        high = c.sbatch(None, "-p", "urgent", "-N1", "-o", str(out), "--wrap", "hostname")
        c.wait_state(high, "COMPLETED", 60)
        assert out.read_text().strip() in ("node1", "node2")
        assert c.job(low)["Restarts"] == "1"  # preempted by requeue
    finally:
        c.client("scancel", str(low))


def test_two_node_job_prints_both_hostnames(slurm_cluster):
    c = slurm_cluster
    out = c.job_dir / "hostnames.out"
    job = c.sbatch(None, "-N2", "-o", str(out), "--wrap", "srun hostname")
    info = c.wait_state(job, "COMPLETED", 60)
    assert info["NodeList"] == "node[1-2]"
    assert sorted(out.read_text().split()) == ["node1", "node2"]


def test_job_runs_as_ordinary_user(slurm_cluster):
    c = slurm_cluster
    uid = uid_of("hpcuser")
    assert uid != 0
    out = c.job_dir / "whoami.out"
    script = "#!/bin/bash\nid -u\nsrun -N2 id -u\n"
    job = c.sbatch(script, "-N2", "-o", str(out))
    c.wait_state(job, "COMPLETED", 60)
    assert out.read_text().split() == [str(uid)] * 3
    assert out.stat().st_uid == uid


def test_requeue_restarts_on_other_node(slurm_cluster):
    c = slurm_cluster
    out = c.job_dir / "requeue.out"
    script = "#!/bin/bash\necho run ${SLURM_RESTART_COUNT:-0} $(hostname)\nexec sleep 300\n"
    job = c.sbatch(script, "-N1", "--open-mode=append", "-o", str(out))
    try:
        first = c.wait_state(job, "RUNNING", 30)["NodeList"]
        wait_for(lambda: out.exists() and run_lines(out), what="first run's output")
        c.scontrol("requeue", str(job))
        # An update sent while the job is still COMPLETING is lost: wait for PENDING.
        assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
        c.scontrol("update", f"JobId={job}", f"ExcNodeList={first}", "StartTime=now")
        second = c.wait_state(job, "RUNNING", 60)["NodeList"]
        assert {first, second} == {"node1", "node2"}
        wait_for(lambda: len(run_lines(out)) == 2, what="second run's output")
        assert run_lines(out) == [f"run 0 {first}", f"run 1 {second}"]
        assert out.stat().st_uid == uid_of("hpcuser")
    finally:
        c.client("scancel", str(job))


def test_down_twice_leaves_nothing_then_up_again(slurm_cluster):
    c = slurm_cluster
    job = c.sbatch(None, "-N2", "-o", "/dev/null", "--wrap", "srun sleep 300")
    c.wait_state(job, "RUNNING", 30)
    wait_for(lambda: len(glob.glob(f"/sys/fs/cgroup/freezer/slurm_node*/uid_*/job_{job}")) == 2,
             what="the job's cgroups on both nodes")

    start = time.monotonic()
    c.down()
    assert time.monotonic() - start < 30
    assert_torn_down(c)
    again = cli("down", "--dir", str(c.dir))
    assert again.returncode == 0, again.stderr
    assert_torn_down(c)
    assert cli("status", "--dir", str(c.dir)).returncode == 1

    c.up()
    out = c.job_dir / "after-restart.out"
    job = c.sbatch(None, "-N2", "-o", str(out), "--wrap", "srun hostname")
    c.wait_state(job, "COMPLETED", 60)
    assert sorted(out.read_text().split()) == ["node1", "node2"]
