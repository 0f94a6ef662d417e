"""A checkpointed job's life on the real cluster, as the ordinary user hpcuser: periodic
checkpoints, requeue by an operator, the time-limit warning, preemption, restart on the other
node, and a checkpoint directory the job cannot write.

The job computes a deterministic sequence: every step folds its number into a running
checksum and prints both (with the host), and it ends with `done <checksum>`.  A restored job
goes on from its checkpoint: the first step printed after `hpccr: restart N of job J:
restoring …` is not step 1, and the final checksum is the one of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from hpccr_site import Site, ended, wait_for, write_script

from testbed.cluster import ClusterError

STEPS = 90
STEP_S = 0.3
SEQUENCE = f"""#!/bin/bash
n=${{1:-{STEPS}}}
i=0
sum=0
while [ $i -lt $n ]; do
    i=$((i + 1))
    sum=$(( (sum * 31 + i) % 1000003 ))
    echo "step $i sum $sum on $(hostname)"
    sleep {STEP_S}
done
echo "done $sum"
"""
STEP = re.compile(r"^step (\d+) sum (\d+) on (\S+)$")

RECORD_HOOK = """import json, os

def record(info):
    with open(os.environ["HOOK_RECORD"], "a") as f:
        f.write(json.dumps(info) + "\\n")
"""


def recording_hooks(site: Site, record: Path, *events: str) -> dict[str, str]:
    """Environment for a job whose site hooks append each event's dict to `record`."""
    hooks = site.dir / "hooks"
    hooks.mkdir(mode=0o755, exist_ok=True)
    (hooks / "recordhooks.py").write_text(RECORD_HOOK)
    record.unlink(missing_ok=True)
    return {"PYTHONPATH": str(hooks), "HOOK_RECORD": str(record),
            **{f"HPCCR_HOOKS_{e.upper()}": "recordhooks:record" for e in events}}


def expected_sum(steps: int = STEPS) -> int:
    total = 0
    for i in range(1, steps + 1):
        total = (total * 31 + i) % 1000003
    return total


def steps_of(text: str) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(3)) for line in text.splitlines()
            if (m := STEP.match(line))]


def submit(site: Site, how: str, *options: str, user: str | None = "hpcuser",
           args: list[str] = (), **env: str) -> int:
    """Submit SEQUENCE (with `args`) as `user` (root if None) with the plugin's
    `sbatch --checkpoint…` or with `hpccr sbatch`, with `env` in the job's environment."""
    script = write_script(site, "sequence.sh", SEQUENCE)
    if how == "plugin":
        return site.submit("--requeue", "--open-mode=append", *options, str(script), *args,
                           user=user, **env)
    run = site.cluster.client(*site.env(**env), site.user_hpccr, "sbatch", *options,
                              str(script), *args, user=user)
    return int(run.stdout.split()[-1])


def completed(site: Site, job: int, out: Path, timeout: float) -> dict[str, str]:
    """Wait for the job to complete; if it does not, fail with its state and its output."""
    c = site.cluster
    try:
        return c.wait_state(job, "COMPLETED", timeout)
    except ClusterError:
        info = c.job(job) or {}
        state = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}
        text = out.read_text() if out.exists() else "(no output)"
        raise AssertionError(f"job {job} did not complete: {state}\noutput:\n{text}") from None


def running_as(uid: int, script: str) -> list[int]:
    """The processes of `uid` that run `script`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and proc.stat().st_uid == uid \
                    and script in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def checkpoints_taken(site: Site, job: int, user: str = "hpcuser") -> int:
    latest = site.job_dir(user, job) / "latest"
    return int(latest.resolve().name.split("-")[1]) if latest.exists() else 0


def check_continued(text: str, restarts: int, steps: int = STEPS) -> None:
    """The output of a job restored `restarts` times from checkpoints: complete, continued
    (not started over) after each restore, with the right checksum."""
    assert f"done {expected_sum(steps)}" in text, text
    parts = re.split(r"hpccr: restart \d+ of job \d+: restoring \S+\n", text)
    assert len(parts) == restarts + 1, text
    for part in parts[1:]:
        after = steps_of(part)
        assert after and after[0][0] > 1, f"started over after a restore:\n{text}"
    numbers = [n for n, _ in steps_of(text)]
    assert set(numbers) == set(range(1, steps + 1)), text  # every step, none skipped


def preempt(site: Site, jobs: list[int], node: str) -> int:
    """A short job of the urgent partition that needs all of `node`: it preempts what runs
    there."""
    urgent = site.cluster.sbatch(None, "-p", "urgent", "-w", node, "--exclusive",
                                 "-o", "/dev/null", "--wrap", "sleep 2")
    jobs.append(urgent)
    return urgent


@pytest.mark.parametrize("how, user", [("plugin", "hpcuser"), ("hpccr-sbatch", "hpcuser"),
                                       ("plugin", "root")])
def test_requeued_job_finishes_on_the_other_node(site, jobs, how, user):
    """Started on node1, requeued mid-run, restarted with node1 excluded: it goes on from its
    newest checkpoint on node2 and ends with the checksum of an uninterrupted run.  A user's
    job through its agent, root's by hpccr run / hpccr restore directly."""
    c = site.cluster
    out = c.job_dir / f"requeue-{how}-{user}.out"
    record = c.job_dir / f"restore-hooks-{how}-{user}.json"
    env = recording_hooks(site, record, "before_restore", "after_restore")
    job = submit(site, how, "--checkpoint=0:02", "--exclude=node2", "-o", str(out),
                 user=None if user == "root" else user, **env)
    jobs.append(job)
    assert c.wait_state(job, "RUNNING", 30)["NodeList"] == "node1"
    wait_for(lambda: checkpoints_taken(site, job, user) >= 2, 60, "two periodic checkpoints")
    c.scontrol("requeue", str(job))
    assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
    assert "kept for the restart" in ended(site, job)
    c.scontrol("update", f"JobId={job}", "ExcNodeList=node1", "StartTime=now")
    info = completed(site, job, out, 120)
    assert info["NodeList"] == "node2" and info["ExitCode"] == "0:0"
    text = out.read_text()
    check_continued(text, restarts=1)
    # The job has a host name of its own, the same on either node (hpccr/engine/netns.py).
    assert {host for _, host in steps_of(text)} == {f"job{job}"}, text
    assert out.stat().st_uid == (0 if user == "root" else c.ensure_user().pw_uid)
    before, after = (json.loads(line) for line in record.read_text().splitlines())
    restored = re.search(r"restoring (\S+)\n", text).group(1)
    assert (before["event"], before["path"]) == ("before_restore", restored)
    assert (after["event"], after["path"], after["ok"]) == ("after_restore", restored, True)
    assert after["node"] == "node2" and after["restart_count"] == 1


@pytest.mark.parametrize("daemon", ["slurmd", "slurmctld"])
def test_job_outlives_a_restart_of_slurm(site, jobs, daemon):
    """An ordinary user's checkpointed job on node1 (run by its agent there) while Slurm's
    daemons restart: [slurmd] node1's slurmd restarted after the job's first checkpoint: the
    job runs on and its checkpoints go on; [slurmctld] the controller restarted while the job,
    requeued, is pending.  Either way it restarts on node2 from its latest checkpoint — not
    from scratch, and only once — and ends with the checksum of an uninterrupted run."""
    c = site.cluster
    out = c.job_dir / f"outlives-{daemon}.out"
    job = submit(site, "plugin", "--checkpoint=0:02", "--exclude=node2", "-o", str(out))
    jobs.append(job)
    assert c.wait_state(job, "RUNNING", 30)["NodeList"] == "node1"
    wait_for(lambda: checkpoints_taken(site, job) >= 1, 60, "a periodic checkpoint")
    if daemon == "slurmd":
        c.restart("slurmd", "node1")
        taken = checkpoints_taken(site, job)
        wait_for(lambda: checkpoints_taken(site, job) >= taken + 2, 60,
                 "two checkpoints after slurmd's restart")
        assert c.job(job)["JobState"] == "RUNNING", out.read_text()
    c.scontrol("requeuehold", str(job))
    assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
    assert "kept for the restart" in ended(site, job)
    if daemon == "slurmctld":
        c.restart("slurmctld")
        assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
    c.scontrol("update", f"JobId={job}", "ExcNodeList=node1", "StartTime=now")
    c.scontrol("release", str(job))
    info = completed(site, job, out, 120)
    assert info["NodeList"] == "node2" and info["ExitCode"] == "0:0"
    assert info["Restarts"] == "1", info
    check_continued(out.read_text(), restarts=1)


def test_job_whose_agent_is_killed_fails_and_restarts_from_its_checkpoint(site, jobs):
    """The agent of an ordinary user's checkpointed job SIGKILLed after the job's first
    checkpoint: the job fails, saying why in its output, and nothing of it runs on; its
    checkpoints are kept, and requeued it restarts on node2 from the latest one and ends with
    the checksum of an uninterrupted run."""
    c = site.cluster
    out = c.job_dir / "agent-killed.out"
    job = submit(site, "plugin", "--checkpoint=0:02", "--exclude=node2", "-o", str(out))
    jobs.append(job)
    assert c.wait_state(job, "RUNNING", 30)["NodeList"] == "node1"
    wait_for(lambda: checkpoints_taken(site, job) >= 1, 60, "a periodic checkpoint")
    script = str(site.job_dir("hpcuser", job) / "job-script")  # what the job runs
    uid = c.ensure_user().pw_uid
    assert running_as(uid, script), "the job's script is not found running"
    agent = int((site.dir / "run" / f"agent-{job}.node1.pid").read_text())
    os.kill(agent, signal.SIGKILL)
    info = c.wait_state(job, ("FAILED", "COMPLETED", "CANCELLED"), 60)
    text = out.read_text()
    assert info["JobState"] == "FAILED", (info, text)
    assert "the hpccr agent went away before the job ended" in text, text
    assert "kept" in ended(site, job)  # the epilog ran: the job's processes are gone
    assert not running_as(uid, script), "the job runs on"
    c.scontrol("requeue", str(job))
    c.scontrol("update", f"JobId={job}", "ExcNodeList=node1", "StartTime=now")
    info = completed(site, job, out, 120)
    assert info["NodeList"] == "node2" and info["ExitCode"] == "0:0"
    check_continued(out.read_text(), restarts=1)


def test_time_limit_warning_checkpoints_and_requeues(site, jobs):
    """--time with --signal=B:USR1@…: on the warning the job is checkpointed, stopped and
    requeued by hpccr itself, and each run goes on from there until it completes.  Slurm sends
    the warning up to a minute early: with --time=2 and @30 it comes 30 to 90 s into each run,
    so the job (400 steps, over two minutes) needs two runs or more and each makes progress."""
    c = site.cluster
    out = c.job_dir / "timelimit.out"
    steps = 400
    job = submit(site, "plugin", "--checkpoint=10:00", "--time=2", "--signal=B:USR1@30",
                 "-o", str(out), args=[str(steps)])
    jobs.append(job)
    wait_for(lambda: out.exists() and "and stopped" in out.read_text(), 150,
             "the final checkpoint on USR1")
    info = completed(site, job, out, 600)
    assert info["ExitCode"] == "0:0"
    text = out.read_text()
    stops = re.findall(r"hpccr: SIGUSR1: job checkpointed to \S+ and stopped", text)
    requeues = re.findall(rf"hpccr: job {job} requeued; it goes on from its checkpoint", text)
    assert stops and len(stops) == len(requeues) == int(info["Restarts"]), text
    check_continued(text, restarts=len(stops), steps=steps)


def test_preempted_job_resumes_from_its_checkpoint(site, jobs):
    """A job of the urgent partition preempts it (PreemptMode=REQUEUE); it resumes from its
    newest periodic checkpoint afterwards."""
    c = site.cluster
    out = c.job_dir / "preempted.out"
    job = submit(site, "plugin", "--checkpoint=0:02", "-p", "batch", "-w", "node1",
                 "-o", str(out))
    jobs.append(job)
    c.wait_state(job, "RUNNING", 30)
    wait_for(lambda: checkpoints_taken(site, job) >= 2, 60, "two periodic checkpoints")
    urgent = preempt(site, jobs, "node1")
    c.wait_state(urgent, "COMPLETED", 120)
    info = completed(site, job, out, 180)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "0:0"
    check_continued(out.read_text(), restarts=int(info["Restarts"]))


def test_failed_checkpoint_leaves_the_job_running(site, jobs, tmp_path):
    """Checkpoints into a directory the user cannot write fail, visibly in the job's output;
    the job runs on — also past a USR1 whose final checkpoint fails — and completes."""
    c = site.cluster
    readonly = c.job_dir / "readonly-checkpoints"
    readonly.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(readonly, "root")
    out = c.job_dir / "readonly.out"
    job = submit(site, "plugin", "--checkpoint=0:02", f"--checkpoint-dir={readonly}",
                 "-o", str(out))
    jobs.append(job)
    wait_for(lambda: out.exists() and "failed, the job runs on" in out.read_text(), 60,
             "a failed periodic checkpoint")
    c.client("scancel", "--batch", "--signal=USR1", str(job))
    info = completed(site, job, out, 120)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    text = out.read_text()
    assert re.search(rf"hpccr: checkpoint {readonly}/ckpt-\d+ failed, the job runs on: .*"
                     r"[Pp]ermission denied", text), text
    assert "and stopped" not in text
    assert f"done {expected_sum()}" in text
    assert [n for n, _ in steps_of(text)] == list(range(1, STEPS + 1))
    assert not any(readonly.iterdir())


def test_restart_without_checkpoint_starts_over_and_says_so(site, jobs):
    c = site.cluster
    out = c.job_dir / "nocheckpoint.out"
    job = submit(site, "plugin", "--checkpoint=1:00:00", "-o", str(out))
    jobs.append(job)
    c.wait_state(job, "RUNNING", 30)
    wait_for(lambda: out.exists() and steps_of(out.read_text()), 30, "the first steps")
    c.scontrol("requeue", str(job))
    c.wait_state(job, "PENDING", 30)
    c.scontrol("update", f"JobId={job}", "StartTime=now")
    info = completed(site, job, out, 120)
    assert info["ExitCode"] == "0:0"
    text = out.read_text()
    assert re.search(rf"hpccr: restart 1 of job {job}: no complete checkpoint in \S+, "
                     "starting over", text), text
    assert f"done {expected_sum()}" in text




@pytest.mark.parametrize("user", ["hpcuser", None])
def test_checkpoint_hooks_run_around_each_checkpoint(site, jobs, user):
    """before_checkpoint / after_checkpoint hooks run in the job's own process, as its user,
    around every checkpoint — whether the agent (a user's job) or hpccr run (root's) takes it."""
    c = site.cluster
    record = c.job_dir / f"checkpoint-hooks-{user}.json"
    out = c.job_dir / f"checkpoint-hooks-{user}.out"
    script = write_script(site, "sequence.sh", SEQUENCE)
    env = recording_hooks(site, record, "before_checkpoint", "after_checkpoint")
    job = site.submit("--checkpoint=0:02", "-o", str(out), str(script), "20", user=user, **env)
    jobs.append(job)
    completed(site, job, out, 60)
    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(events) >= 2 and len(events) % 2 == 0, events
    owner = "root" if user is None else user
    for before, after in zip(events[::2], events[1::2], strict=True):
        assert before["event"] == "before_checkpoint" and after["event"] == "after_checkpoint"
        assert before["path"] == after["path"]
        assert re.fullmatch(rf"{site.job_dir(owner, job)}/ckpt-\d{{4}}", after["path"])
        assert after["ok"] is True and after["error"] is None
        assert after["job_id"] == str(job) and after["user"] == owner
    assert record.stat().st_uid == (0 if user is None else c.ensure_user().pw_uid)


SRUN_SCRIPT = """#!/bin/bash
echo "job host $(hostname)"
srun -N1 -n1 bash -c 'echo "step host $(hostname)"; until [ -e {step_ends} ]; do sleep 0.1; done'
echo "srun status $?"
until [ -e {job_ends} ]; do sleep 0.1; done
"""
STEP_REFUSED = "a job cannot be checkpointed while a step runs"


def test_srun_inside_a_checkpointed_job(site, jobs):
    """A job step started with srun from inside a checkpointed job (its own network) runs and
    reports back (slurmstepd calls srun back on the job's address).  While it runs, the
    periodic checkpoints are refused, saying why, and the job runs on; once it has ended, the
    job is checkpointed again."""
    c = site.cluster
    out = c.job_dir / "srun-inside.out"
    step_ends, job_ends = c.job_dir / "srun-step-ends", c.job_dir / "srun-job-ends"
    script = write_script(site, "srun-inside.sh",
                          SRUN_SCRIPT.format(step_ends=step_ends, job_ends=job_ends))
    job = site.submit("--checkpoint=0:02", "-N1", "-o", str(out), str(script))
    jobs.append(job)
    wait_for(lambda: out.exists() and STEP_REFUSED in out.read_text(), 60,
             "a checkpoint refused while the step runs")
    assert checkpoints_taken(site, job) == 0
    step_ends.touch()
    wait_for(lambda: checkpoints_taken(site, job) >= 1, 60, "a checkpoint after the step")
    job_ends.touch()
    info = completed(site, job, out, 120)
    text = out.read_text()
    assert info["ExitCode"] == "0:0", text
    assert f"job host job{job}" in text, text
    assert f"step host {info['NodeList']}" in text and "srun status 0" in text, text


WORKLOADS = Path(__file__).resolve().parents[1] / "workloads" / "mpi"
MPI4PY = Path(__file__).resolve().parents[2] / ".mpi4py"  # scripts/setup.sh builds it
RING_STEPS = 600
MPI_LAUNCH = {  # compiler, and the batch script's launch line, but the program
    "mpich": ("mpicc.mpich", "mpiexec.mpich -n 4"),
    "openmpi": ("mpicc.openmpi", "mpirun.openmpi --oversubscribe -np 4"),
}


ROOT_MPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def mpi_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("STEP ", "DONE "))]


def check_mpi_continued(text: str, expected: list[str]) -> None:
    """The output of an MPI job restored once: what it printed before is the start of what a
    run never interrupted prints (`expected`), what it printed after the restore is the end of
    it, and nothing in between is missing.  hpccr's "restart" message starts a line of its own,
    even when the requeue cut the launcher's last write short: that last line is then only
    the start of its expected line."""
    assert "\nhpccr: restart" in text or text.startswith("hpccr: restart"), text
    before, _, after = text.partition("restoring")
    first, again = mpi_lines(before), mpi_lines(after)
    if first and first[-1] not in expected:
        cut = first.pop()
        assert len(first) < len(expected) and expected[len(first)].startswith(cut), text
    assert first == expected[:len(first)], text
    assert again and again == expected[len(expected) - len(again):], text
    assert len(expected) - len(again) <= len(first), f"steps were skipped:\n{text}"


@pytest.mark.parametrize("kind", ["c", "mpi4py"])
@pytest.mark.parametrize("mpi", sorted(MPI_LAUNCH))
def test_mpi_job_moves_to_the_other_node(site, jobs, mpi, kind):
    """An MPI job (4 ranks, large messages between them, the launcher and its proxy or daemon)
    of an ordinary user — ring.c, or ring.py with mpi4py — checkpointed every 2 s on node1,
    requeued, restored on node2: it ends with exactly what a run never interrupted prints."""
    compiler, launch = MPI_LAUNCH[mpi]
    if not shutil.which(compiler):
        pytest.skip(f"{mpi} not installed")
    c = site.cluster
    if kind == "c":
        program = c.job_dir / f"ring-{mpi}"
        subprocess.run([compiler, "-O2", "-o", program, WORKLOADS / "ring.c"], check=True,
                       capture_output=True)
    else:
        if not (MPI4PY / mpi / "mpi4py").is_dir():
            pytest.skip(f"no mpi4py for {mpi} (scripts/setup.sh builds it)")
        program = f"/usr/bin/python3 {WORKLOADS / 'ring.py'} {MPI4PY / mpi}"
    line = f"{launch} {program} {RING_STEPS}"
    reference = subprocess.run(["runuser", "-u", "hpcuser", "--", "bash", "-c", line],
                               capture_output=True, text=True, timeout=300, check=True)
    out = c.job_dir / f"mpi-{mpi}-{kind}.out"
    script = write_script(site, f"mpi-{mpi}-{kind}.sh", f"#!/bin/bash\n{line}\n")
    job = site.submit("--requeue", "--open-mode=append", "--checkpoint=0:02",
                      "--exclude=node2", "-o", str(out), str(script))
    jobs.append(job)
    assert c.wait_state(job, "RUNNING", 30)["NodeList"] == "node1"
    try:
        wait_for(lambda: checkpoints_taken(site, job) >= 1, 120, "a periodic checkpoint")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; output:\n{out.read_text() if out.exists() else ''}") \
            from None
    c.scontrol("requeue", str(job))
    assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
    ended(site, job)
    c.scontrol("update", f"JobId={job}", "ExcNodeList=node1", "StartTime=now")
    info = completed(site, job, out, 300)
    text = out.read_text()
    assert info["NodeList"] == "node2" and info["ExitCode"] == "0:0", text
    check_mpi_continued(text, mpi_lines(reference.stdout))
