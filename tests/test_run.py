"""`hpccr run`: a job in its own pid, mount and IPC namespaces under hpccr-init, its stdio, exit
status and signals passed through, orphans reaped; with --interval, a series of checkpoints of
the whole job that restores with the same pids, even twice at once, and that holds at the first
try while a job script runs short commands.

Workload: workloads/tree_counter.c STEPS STEP_MS (prints COUNT 0 .. STEPS-1, PASS if it received
every number once and in order); the rest are small sh scripts run as jobs.
"""

import fcntl
import json
import os
import re
import signal
import subprocess

import pytest
from harness import TIMEOUT, describe, ns_pids, proc_status, tree_of, wait_until

from hpccr.duration import parse_duration
from hpccr.engine import procfs
from hpccr.image.series import Series
from hpccr.run import Checkpoints

FORWARDED = ("TERM", "INT", "HUP", "USR1", "USR2", "CONT")
CKPT = re.compile(r"ckpt-(\d{4})")


def catches(pid: int, names: tuple[str, ...]) -> bool:
    """Has ``pid`` installed handlers for all these signals (SigCgt)?"""
    caught = int(proc_status(pid)["SigCgt"], 16)
    wanted = sum(1 << (signal.Signals[f"SIG{name}"] - 1) for name in names)
    return caught & wanted == wanted


def counts(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("COUNT ")]


def checkpoints(series) -> list[str]:
    return sorted(p.name for p in series.iterdir() if CKPT.fullmatch(p.name))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("90", 5400),  # a bare number counts minutes, as in Slurm
        ("05:30", 330),
        ("01:02:03", 3723),
        ("2-03", 2 * 86400 + 3 * 3600),
        ("2-03:04", 2 * 86400 + 3 * 3600 + 4 * 60),
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_exit_status_passes_through(tree_cr):
    job = tree_cr.start_job(["sh", "-c", "exit 7"], ready=False)
    assert job.wait_exit(TIMEOUT) == 7, job.output()
    assert job.pid > 0, job.output()


def test_killed_job_gives_128_plus_signal(tree_cr):
    job = tree_cr.start_job(["sh", "-c", "kill -USR1 $$"], ready=False)
    assert job.wait_exit(TIMEOUT) == 128 + signal.SIGUSR1, job.output()


def test_stdio_passes_through(tree_cr, tmp_path):
    (tmp_path / "in").write_text("first line\nsecond line\n")
    with open(tmp_path / "in") as stdin:
        job = tree_cr.start_job(
            ["sh", "-c", 'read -r first; echo "got $first"; cat; echo "to stderr" >&2'],
            stdin=stdin.fileno(),
            stderr=tmp_path / "err",
            ready=False,
        )
    assert job.wait_exit(TIMEOUT) == 0, job.output()
    assert job.output() == "got first line\nsecond line\n"
    errors = (tmp_path / "err").read_text().splitlines()
    assert sorted(errors) == sorted([f"hpccr run: job pid {job.pid}", "to stderr"]), errors


def test_job_has_its_own_namespaces(tree_cr, tmp_path):
    """The command is pid 2 under hpccr-init, its /proc shows the job alone, and its pid, mount
    and IPC namespaces are not ours; --pidfile names the same pid 1 as the stderr line."""
    script = (
        "echo $$; echo /proc/[0-9]*; read -r init < /proc/1/comm; echo $init; "
        "readlink /proc/self/ns/pid /proc/self/ns/mnt /proc/self/ns/ipc"
    )
    job = tree_cr.start_job(
        ["sh", "-c", script],
        "--pidfile",
        tmp_path / "job.pid",
        stderr=tmp_path / "err",
        ready=False,
    )
    assert job.wait_exit(TIMEOUT) == 0, job.output()
    ours = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("pid", "mnt", "ipc")]
    lines = job.lines()
    assert lines[:3] == ["2", "/proc/1 /proc/2", "hpccr-init"], lines
    theirs = lines[3:]
    assert [ns.split(":")[0] for ns in theirs] == ["pid", "mnt", "ipc"], lines
    assert all(a != b for a, b in zip(theirs, ours, strict=True)), (theirs, ours)
    assert (tmp_path / "job.pid").read_text().split() == [str(job.pid)]


@pytest.mark.parametrize("name", ["TERM", "INT", "HUP", "USR1", "USR2"])
def test_signals_reach_the_job(tree_cr, tmp_path, name):
    script = f'trap "echo caught {name}; exit 42" {name}; echo ready; while :; do sleep 0.05; done'
    job = tree_cr.start_job(["sh", "-c", script], stderr=tmp_path / "err", ready=False)
    tree_cr.wait_until(lambda: "ready" in job.lines(), "the job's trap")
    tree_cr.wait_until(lambda: catches(job.proc.pid, FORWARDED), "hpccr run's signal handlers")
    job.proc.send_signal(signal.Signals[f"SIG{name}"])
    assert job.wait_exit(TIMEOUT) == 42, job.output()
    assert job.lines() == ["ready", f"caught {name}"]


def test_orphans_are_reaped(tree_cr, tmp_path):
    """Three sleeps whose parents exit at once: hpccr-init adopts them (their parent is pid 1)
    and reaps them when they end, so the job's /proc then shows hpccr-init and sh alone."""
    script = (
        'o=; for i in 1 2 3; do o="$o $( (sleep 1 >/dev/null & echo $!) )"; done; sleep 0.3; '
        'for p in $o; do read -r s < /proc/$p/stat; echo "during $s"; done; sleep 1.7; '
        'for f in /proc/[0-9]*/stat; do read -r s < $f; echo "after $s"; done'
    )
    job = tree_cr.start_job(["sh", "-c", script], stderr=tmp_path / "err", ready=False)
    assert job.wait_exit(TIMEOUT) == 0, job.output()
    during = [line.split()[1:5] for line in job.lines() if line.startswith("during ")]
    after = [line.split()[1:4] for line in job.lines() if line.startswith("after ")]
    assert len(during) == 3 and all(f[1:] == ["(sleep)", "S", "1"] for f in during), job.output()
    assert after == [["1", "(hpccr-init)", "S"], ["2", "(sh)", "R"]], job.output()


def test_bad_interval_is_a_usage_error(tree_cr, tmp_path):
    for value in ("x", "0", "90x", "1:2:3:4", "2-"):
        res = tree_cr.run("run", "-D", tmp_path / "series", "--interval", value, "--", "true")
        assert "interval" in tree_cr.assert_error(res, 2), describe(res)
        assert not (tmp_path / "series").exists()


def test_interval_needs_a_directory(tree_cr):
    res = tree_cr.run("run", "--interval", "2s", "--", "true")
    assert "-D" in tree_cr.assert_error(res, 2)


def test_interval_checkpoints_a_series_that_restores(tree_cr, tmp_path):
    """Checkpoints every 2 s into ckpt-0001, ckpt-0002, ... with `latest` moved to each in turn
    and the newest two kept, each a complete image.  The job is killed after the third; restoring
    the series directory goes on from the third checkpoint: the counter never restarts at 0 and
    the job PASSes."""
    steps = 600  # 12 s at 20 ms a step: enough for three checkpoints and a restore
    series = tmp_path / "series"
    counter = [tree_cr.binaries["tree_counter"], steps, 20]
    job = tree_cr.start_job(counter, "-D", series, "--interval", "2s", "--keep", "2")
    seen: dict[str, int] = {}  # image -> the last count printed when `latest` named it

    def third() -> bool:
        latest = series / "latest"
        if latest.is_symlink():
            seen.setdefault(os.readlink(latest), max(counts(job.lines()), default=-1))
        assert job.alive(), f"the job ended before its third checkpoint:\n{job.output()}"
        return "ckpt-0003" in seen

    tree_cr.wait_until(third, "the third checkpoint")
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait_exit(10) == 128 + signal.SIGKILL
    before = job.lines()
    assert sorted(seen) == ["ckpt-0001", "ckpt-0002", "ckpt-0003"], seen
    kept = checkpoints(series)
    last = int(CKPT.fullmatch(kept[-1]).group(1))
    newest = [f"ckpt-{last - 1:04d}", f"ckpt-{last:04d}"]
    # and the images they leave pages to (incremental checkpoints: test_incremental.py)
    parents = {json.loads((series / name / "image.json").read_text()).get("parent", {})
               .get("image") for name in kept}
    assert set(kept) == set(newest) | (parents & set(kept)) and set(newest) <= set(kept), kept
    assert os.readlink(series / "latest") == kept[-1]
    for name in kept:
        res = tree_cr.run("show", series / name)
        assert res.returncode == 0, describe(res)

    res = tree_cr.restore(series)
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    old, new = counts(before), counts(job.lines()[len(before) :])
    assert old == list(range(len(old))), "the job's own output is not a plain count"
    assert new and new == list(range(new[0], steps)), f"restored counts {new}"
    assert new[0] - 1 >= seen[f"ckpt-{last - 1:04d}"], "not restored from the latest image"
    assert 0 < new[0] <= old[-1] + 1, f"restored at {new[0]}, killed at {old[-1]}"
    job.assert_passed()


SCRIPT = """i=0; sum=0
while [ $i -lt {steps} ]; do
    i=$((i + 1)); sum=$(( (sum * 31 + i) % 1000003 ))
    echo "step $i sum $sum on $(hostname)"
    sleep 0.05
done
echo "done $sum"
"""


def test_interval_checkpoints_of_a_script_running_commands(tree_cr, tmp_path):
    """A job script that runs short commands all the time ($(hostname), sleep) checkpointed
    every second: every checkpoint is taken at the first try (none fails, no memory snapshot
    is lost and taken again), and the script's result is right."""
    steps, total = 120, 0
    for i in range(1, steps + 1):
        total = (total * 31 + i) % 1000003
    script = tmp_path / "steps.sh"
    script.write_text(SCRIPT.format(steps=steps))
    series, errors = tmp_path / "series", tmp_path / "errors"
    job = tree_cr.start_job(["sh", script], "-D", series, "--interval", "1s", "--keep", "2",
                            stderr=errors, ready=False)
    assert job.wait_exit() == 0, job.output() + errors.read_text()
    assert job.lines()[-1] == f"done {total}", job.output()
    complaints = [line for line in errors.read_text().splitlines()
                  if not line.startswith("hpccr run: job pid ")]
    assert not complaints, complaints
    last = int(CKPT.fullmatch(checkpoints(series)[-1]).group(1))
    assert last >= 3, f"only {last} checkpoints"


def test_checkpoint_as_the_job_ends(tmp_path, capfd):
    """A periodic checkpoint that begins as the job ends (its root exited, not yet waited for
    by hpccr run): nothing is taken and nothing is said — the job ended, nothing failed (it
    used to fail with a traceback of hpccr run, or "checkpoint failed")."""
    series = tmp_path / "series"
    series.mkdir()
    events = []
    checkpoints = Checkpoints(Series(series), 1.0, 2,
                              notify=lambda event, **fields: events.append((event, fields)))
    job = subprocess.Popen(["true"])
    try:
        wait_until(lambda: procfs.state(job.pid) == "Z", "the job ended")
        assert checkpoints.take(job.pid, "running") is None
    finally:
        job.wait()
    assert capfd.readouterr().err == ""
    assert events[-1][0] == "after_checkpoint" and events[-1][1]["ok"] is False, events
    assert checkpoints.series.images() == [], "an image of an ended job"


def test_same_image_restored_twice_at_once(tree_cr, tmp_path):
    """Two restores of one image of a job run side by side, each in a fresh pid namespace with
    the job's own pids 1, 2 and 3, and both go on from the checkpoint to PASS."""
    steps, img = 400, tmp_path / "img"
    job = tree_cr.start_job([tree_cr.binaries["tree_counter"], steps, 20])
    job.wait_for("COUNT 20")
    tree_cr.dump_and_kill(job, img)
    before = len(job.lines())
    restores = [tree_cr.start_restore(img) for _ in range(2)]

    def started() -> bool:
        for proc, pidfile in restores:
            assert proc.poll() is None or pidfile.exists(), proc.communicate(timeout=10)
        return all(p.exists() and p.read_text().endswith("\n") for _, p in restores)

    tree_cr.wait_until(started, "both restored jobs")
    outer = [int(pidfile.read_text()) for _, pidfile in restores]
    assert [[ns_pids(pid)[-1] for pid in tree_of(o)] for o in outer] == [[1, 2, 3]] * 2
    assert len({os.readlink(f"/proc/{pid}/ns/pid") for pid in outer}) == 2
    for proc, _ in restores:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{err}\nlog:\n{job.output()}"
    after = job.lines()[before:]
    new = counts(after)
    first = min(new)
    assert 20 < first and sorted(new) == sorted(list(range(first, steps)) * 2), new
    assert after.count("PASS") == 2 and job.values("PID") == ["2"] * 3, job.output()


def test_series_in_use_is_never_shared(tree_cr, tmp_path):
    """While a restore reads a series (its shared lock, taken here), a checkpoint into it is
    refused and the job runs on; once it is free the checkpoint is taken (the job stops, 75).
    While a checkpoint is written into it (its exclusive lock, taken here), a restore of it is
    refused (22) and restores nothing; once it is free the restore works."""
    series = tmp_path / "series"
    series.mkdir()
    job = tree_cr.start_job([tree_cr.binaries["tree_counter"], 500, 20], "-D", series,
                            "--checkpoint-on", "USR1")
    tree_cr.wait_until(lambda: catches(job.proc.pid, ("USR1",)), "hpccr run's USR1 handler")
    refused = re.compile(rf"hpccr: checkpoint {series}/ckpt-0001 failed, the job runs on: "
                         rf"{series} is in use by another hpccr .*: cannot checkpoint")
    held = os.open(series, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_SH)  # as a restore reading it
        job.proc.send_signal(signal.SIGUSR1)
        tree_cr.wait_until(lambda: any(refused.match(line) for line in job.lines()),
                           "the refused checkpoint")
        assert job.alive() and not checkpoints(series), job.output()
        fcntl.flock(held, fcntl.LOCK_UN)
        job.proc.send_signal(signal.SIGUSR1)
        assert job.proc.wait(TIMEOUT) == 75, job.output()
        assert checkpoints(series) == ["ckpt-0001"]
        fcntl.flock(held, fcntl.LOCK_EX)  # as a checkpoint being written
        message = tree_cr.assert_error(tree_cr.restore(series), 22)
        assert f"{series} is in use by another hpccr" in message, message
        assert not job.alive()
    finally:
        os.close(held)
    res = tree_cr.restore(series)
    assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
    job.assert_passed()
