"""`hpccr run/restore` with stop signals (--checkpoint-on) and for another user (--user): a stop
signal checkpoints the job into its series and stops it (exit 75); the restored job goes on where
it was; a job run for hpcuser runs as hpcuser, its images are hpcuser's, and a restore never
gives a process more than the image's owner (or --user) has.

Workloads: workloads/tree_counter.c STEPS STEP_MS (COUNT 0 .. STEPS-1 once each and in order,
PASS if nothing was lost, repeated or restarted), ghost_modes.c DIR (a deleted file held
read-write whose mode was set to 0), fd_inotify.c DIR, copied where hpcuser can run them.  The
job's output goes to files hpcuser may write: a restored job opens them again as hpcuser.
"""

import grp
import json
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import xxhash
from harness import (  # noqa: F401 - the fixtures shared_dir and user_python
    JOB_PID,
    TIMEOUT,
    USER,
    Job,
    as_user,
    boot_ticks,
    cli_argv,
    cli_env,
    describe,
    pid_alive,
    proc_status,
    shared_dir_fixture,
    started_since,
    tree_of,
    user_python_fixture,
)

from testbed.cluster import SHARED_GROUP

STOPPED = 75
REFUSED = 11
CKPT = re.compile(r"ckpt-(\d{4})")
UID = pwd.getpwnam(USER).pw_uid
GID = pwd.getpwnam(USER).pw_gid


def counts(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("COUNT ")]


def catches(pid: int, *signals: int) -> bool:
    """Has ``pid`` installed handlers for all these signals (SigCgt)?"""
    caught = int(proc_status(pid)["SigCgt"], 16)
    return all(caught & (1 << (sig - 1)) for sig in signals)


def user_file(path: Path) -> Path:
    """An empty file owned by hpcuser (a log the restored job can open again)."""
    path.touch()
    os.chown(path, UID, GID)
    return path


class UserJobs:
    """Jobs and restores for hpcuser in ``home`` (hpcuser's, readable by all); every process
    they started is killed at the end."""

    def __init__(self, tree_cr, home: Path, binary: Path):
        self.cr, self.home = tree_cr, home
        self.counter = home / "tree_counter"
        shutil.copy(binary, self.counter)
        self.counter.chmod(0o755)
        self.log, self.err = user_file(home / "job.log"), user_file(home / "job.err")

    def _start(self, argv: list[str]) -> subprocess.Popen:
        with open(self.log, "ab") as out, open(self.err, "ab") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env=cli_env(),
            )
        self.cr.background.append(proc)
        return proc

    def run(self, steps: int, *options: object) -> Job:
        """``hpccr run OPTIONS -- tree_counter STEPS 20``, once the job has started."""
        argv = cli_argv("run", *options, "--", self.counter, steps, 20)
        since = boot_ticks()
        job = Job(argv, self.log, self._start(argv), errors=self.err, since=since)
        self.cr.workloads.append(job)
        pids = []

        def started() -> bool:
            pids[:] = [line.split()[-1] for line in self.errors() if line.startswith(JOB_PID)]
            assert pids or job.proc.poll() is None, self.err.read_text()
            return bool(pids)

        self.cr.wait_until(started, "hpccr run to start the job")
        job.job_pid = int(pids[-1])
        return job

    def restore(self, series: Path, *options: object) -> tuple[subprocess.Popen, int]:
        """``hpccr restore -D SERIES OPTIONS`` in the background; it and the restored job's
        outer pid, once restored."""
        pidfile = self.home / f"restore{len(self.cr.pidfiles)}.pid"
        self.cr.pidfiles.append(pidfile)
        proc = self._start(cli_argv("restore", "-D", series, "--pidfile", pidfile, *options))

        def restored() -> bool:
            assert proc.poll() is None or pidfile.exists(), self.err.read_text()
            return pidfile.exists() and pidfile.read_text().endswith("\n")

        self.cr.wait_until(restored, "the restored job")
        return proc, int(pidfile.read_text())

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def errors(self) -> list[str]:
        return self.err.read_text(errors="replace").splitlines()

    def wait_count(self, at_least: int, pid: int) -> None:
        def reached() -> bool:
            assert pid_alive(pid), f"the job ended before COUNT {at_least}:\n{self.log_text()}"
            return max(counts(self.lines()), default=-1) >= at_least

        self.cr.wait_until(reached, f"COUNT {at_least}")

    def log_text(self) -> str:
        return self.log.read_text() + "\nhpccr:\n" + self.err.read_text()

    def stop(self, proc: subprocess.Popen, series: Path) -> Path:
        """SIGUSR1 to hpccr: it exits 75 and says which checkpoint it made; that one."""
        self.cr.wait_until(lambda: catches(proc.pid, signal.SIGUSR1), "hpccr's USR1 handler")
        before = len(self.errors())
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(TIMEOUT) == STOPPED, self.log_text()
        said = [line for line in self.errors()[before:] if line.startswith("hpccr: SIGUSR1")]
        assert len(said) == 1, self.log_text()
        match = re.fullmatch(r"hpccr: SIGUSR1: job checkpointed to (\S+) and stopped", said[0])
        assert match and Path(match[1]).parent == series, said
        assert os.readlink(series / "latest") == Path(match[1]).name
        return Path(match[1])


@pytest.fixture
def jobs(tree_cr, shared_dir):
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, UID, GID)
    return UserJobs(tree_cr, home, tree_cr.binaries["tree_counter"])


def assert_runs_as_user(pid: int) -> None:
    """Every process of the job tree at ``pid`` has hpcuser's ids, groups and no capability."""
    tree = tree_of(pid)
    assert len(tree) == 3, tree  # hpccr-init, the counter's root and its child
    for task in tree:
        status = proc_status(task)
        assert status["Uid"].split() == [str(UID)] * 4, (task, status["Uid"])
        assert status["Gid"].split() == [str(GID)] * 4, (task, status["Gid"])
        groups = sorted(int(g) for g in status["Groups"].split())  # the kernel sorts them
        assert groups == sorted(os.getgrouplist(USER, GID)), status["Groups"]
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0, status["CapEff"]


def assert_owned_by_user(series: Path) -> None:
    for path in [series, *series.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (UID, GID), f"{path} owned by {st.st_uid}:{st.st_gid}"


def test_stop_restore_stop_restore_as_user(jobs):
    """run --user --checkpoint-on USR1: the job runs as hpcuser; USR1 makes ckpt-0001 (hpcuser's
    files), kills the job and exits 75.  restore --user --interval 1s --checkpoint-on USR1 goes on
    from there as hpcuser, checkpoints every second, and USR1 stops it again; a plain restore of
    the series (hpcuser's, so limited to hpcuser) runs to the end.  Every count came exactly once
    and in order: no step lost, repeated or restarted across the three runs."""
    steps, series = 300, jobs.home / "series"  # series made by hpccr, as hpcuser
    job = jobs.run(steps, "-D", series, "--checkpoint-on", "USR1", "--user", USER)
    jobs.wait_count(30, job.pid)
    assert_runs_as_user(job.pid)
    first = jobs.stop(job.proc, series)
    assert first.name == "ckpt-0001"
    jobs.cr.wait_until(lambda: not pid_alive(job.pid), "the stopped job gone", 10)
    assert "PASS" not in jobs.lines()
    assert_owned_by_user(series)
    stopped_at = max(counts(jobs.lines()))

    proc, pid = jobs.restore(series, "--user", USER, "--interval", "1s", "--checkpoint-on", "10")
    assert_runs_as_user(pid)
    jobs.wait_count(stopped_at + 20, pid)
    jobs.cr.wait_until(
        lambda: os.readlink(series / "latest") != first.name,
        "a checkpoint every second after the restore",
    )
    second = jobs.stop(proc, series)
    assert int(CKPT.fullmatch(second.name)[1]) > 2, second  # after a periodic one at least
    jobs.cr.wait_until(lambda: not pid_alive(pid), "the stopped job gone", 10)
    assert "PASS" not in jobs.lines()
    assert_owned_by_user(series)

    proc, pid = jobs.restore(series)
    assert proc.wait(TIMEOUT) == 0, jobs.log_text()
    assert counts(jobs.lines()) == list(range(steps)), jobs.log_text()
    assert jobs.lines()[-1] == "PASS" and jobs.lines().count("PASS") == 1, jobs.log_text()
    assert set(line for line in jobs.lines() if line.startswith("PID ")) == {"PID 2"}


def stop_restore_and_pass(jobs, workload: str, *args) -> None:
    """hpcuser's job running `workload` (a copy hpcuser can run), stopped by USR1 into a series
    once READY, restored with --user: it passes."""
    program = jobs.home / workload
    shutil.copy(jobs.cr.binaries[workload], program)
    program.chmod(0o755)
    series = jobs.home / "series"
    argv = cli_argv("run", "-D", series, "--checkpoint-on", "USR1", "--user", USER, "--",
                    program, *args)
    proc = jobs._start(argv)
    jobs.cr.wait_until(lambda: "READY" in jobs.lines() or proc.poll() is not None, "READY")
    assert "READY" in jobs.lines(), jobs.log_text()
    jobs.stop(proc, series)
    restored, _ = jobs.restore(series, "--user", USER)
    assert restored.wait(TIMEOUT) == 0, jobs.log_text()
    assert jobs.lines()[-1] == "PASS" and jobs.lines().count("PASS") == 1, jobs.log_text()


def test_deleted_file_of_mode_0_restored_for_user(jobs):
    """hpcuser's job holds a deleted file read-write, fchmod'ed to 0 since: restore --user
    hpcuser gives it back its descriptor, content and mode (the workload checks all three)."""
    stop_restore_and_pass(jobs, "ghost_modes", jobs.home)


def test_failed_stop_checkpoint_leaves_the_job_running(jobs, shared_dir):
    """A series directory hpcuser cannot write: on USR1 the checkpoint fails, hpccr says so and
    the job runs on without the signal (it would kill the counter); on TERM, a stop signal too,
    the checkpoint fails again and then the job gets the TERM."""
    series = shared_dir / "roots"
    series.mkdir(mode=0o755)
    job = jobs.run(
        400, "-D", series, "--checkpoint-on", "USR1", "--checkpoint-on", "TERM", "--user", USER
    )
    jobs.wait_count(10, job.pid)
    jobs.cr.wait_until(
        lambda: catches(job.proc.pid, signal.SIGUSR1, signal.SIGTERM), "hpccr's signal handlers"
    )
    job.proc.send_signal(signal.SIGUSR1)
    failed = f"hpccr: checkpoint {series}/ckpt-0001 failed, the job runs on: "
    jobs.cr.wait_until(
        lambda: any(line.startswith(failed) for line in jobs.errors()),
        "the failed checkpoint's message",
    )
    now = max(counts(jobs.lines()))
    jobs.wait_count(now + 10, job.pid)  # not killed by the USR1, not left frozen
    assert job.proc.poll() is None
    assert_runs_as_user(job.pid)

    job.proc.send_signal(signal.SIGTERM)
    assert job.proc.wait(TIMEOUT) == 128 + signal.SIGTERM, jobs.log_text()
    assert sum(line.startswith(failed) for line in jobs.errors()) == 2, jobs.log_text()
    assert not any("stopped" in line for line in jobs.errors()), jobs.log_text()
    assert "PASS" not in jobs.lines()
    assert not list(series.iterdir())
    assert not pid_alive(job.pid)


def test_other_signals_reach_the_job(jobs):
    """With --checkpoint-on USR1, USR2 is no stop signal: it is passed on to the job (and kills
    the counter, its default action); nothing is checkpointed."""
    series = jobs.home / "series"
    job = jobs.run(400, "-D", series, "--checkpoint-on", "USR1", "--user", USER)
    jobs.wait_count(5, job.pid)
    jobs.cr.wait_until(
        lambda: catches(job.proc.pid, signal.SIGUSR1, signal.SIGUSR2), "hpccr's signal handlers"
    )
    job.proc.send_signal(signal.SIGUSR2)
    assert job.proc.wait(TIMEOUT) == 128 + signal.SIGUSR2, jobs.log_text()
    assert not (series / "latest").exists()


def image_of_user_job(jobs, steps: int = 200) -> Path:
    """A job run for hpcuser, stopped by USR1 after a few counts: its image (hpcuser's)."""
    series = jobs.home / "series"
    job = jobs.run(steps, "-D", series, "--checkpoint-on", "USR1", "--user", USER)
    jobs.wait_count(5, job.pid)
    image = jobs.stop(job.proc, series)
    jobs.cr.wait_until(lambda: not pid_alive(job.pid), "the stopped job gone", 10)
    return image


def edited_copy(image: Path, to: Path, edit, edit_process=None) -> Path:
    """A copy of ``image`` whose image.json ``edit(creds)`` (and ``edit_process(process)``)
    changed in every process, with checksums that match again, owned by hpcuser like the
    original."""
    shutil.copytree(image, to)
    meta = json.loads((to / "image.json").read_text())
    for proc in meta["processes"]:
        edit(proc["creds"])
        if edit_process is not None:
            edit_process(proc)
    (to / "image.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    lines = []
    for line in (to / "checksums").read_text().splitlines():
        _, _, name = line.split("  ")
        data = (to / name).read_bytes()
        lines.append(f"xxh3-128 {xxhash.xxh3_128(data).hexdigest()}  {len(data)}  {name}\n")
    (to / "checksums").write_text("".join(lines))
    for path in [to, *to.iterdir()]:
        os.chown(path, UID, GID)
    return to


EXCESS = {
    "uid": (lambda c: c.update(uid=[UID, 0, UID, UID]), "uids [1001, 0, 1001, 1001]"),
    "gid": (lambda c: c.update(gid=[0] * 4), "groups root (0)"),
    "group": (lambda c: c["groups"].append(0), "groups root (0)"),
    "cap": (
        lambda c: c.update(cap_eff="0000000000000001"),
        "capabilities (cap_eff 0000000000000001)",
    ),
}


@pytest.mark.parametrize("name", EXCESS)
def test_restore_refuses_more_than_the_owner_has(jobs, tree_cr, tmp_path, shared_dir, name):
    """An image of hpcuser's job edited to give a process root's uid or group, or a capability
    (checksums rewritten, so that only the credentials are wrong), still hpcuser's: a restore,
    with or without --user hpcuser, refuses it (exit 11) before any process exists, naming
    what hpcuser lacks and nothing else."""
    edit, excess = EXCESS[name]
    copy = edited_copy(image_of_user_job(jobs, steps=400), jobs.home / name, edit)
    pidfile = jobs.home / "refused.pid"  # both where hpcuser may read and write, for --user
    for options in ([], ["--user", USER]):
        res = tree_cr.restore(copy, *options, "--pidfile", str(pidfile))
        message = tree_cr.assert_error(res, REFUSED)
        assert f"has {excess}, which user {USER} does not: refused" in message, message
    assert "PASS" not in jobs.lines()


PRIORITY = {
    "nice": {"nice": -5},
    "realtime": {"policy": os.SCHED_FIFO, "priority": 10},
}


@pytest.mark.parametrize("name", PRIORITY)
def test_restore_refuses_a_priority_the_owner_may_not_have(jobs, tree_cr, name):
    """hpcuser's image edited so that a thread asks for a negative nice value or a real-time
    policy, which only root could give it: the restore refuses (exit 11) before any process
    exists."""

    def edit(proc: dict) -> None:
        for thread in proc["threads"]:
            thread["sched"].update(PRIORITY[name])

    copy = edited_copy(image_of_user_job(jobs, steps=400), jobs.home / name,
                       lambda creds: None, edit)
    res = tree_cr.restore(copy, "--pidfile", str(jobs.home / "refused.pid"))
    message = tree_cr.assert_error(res, REFUSED)
    assert "real-time policy or a negative nice value" in message, message
    assert "PASS" not in jobs.lines()


def test_restore_refuses_a_proc_file_of_a_process_outside_the_image(jobs, tree_cr):
    """hpcuser's image edited so that the job's stdout is /proc/N/environ of a process that is
    not the job's (N: none of the image's pids): the restore refuses it (13) in its checks,
    before any process exists, plain and --user alike."""
    image = image_of_user_job(jobs, steps=400)
    meta = json.loads((image / "image.json").read_text())
    outside = 1 + max(t["tid"] for p in meta["processes"] for t in p["threads"])

    def to_proc_file(proc: dict) -> None:
        for fd in proc["fds"]:
            if fd.get("path") == str(jobs.log):
                fd.pop("content", None)
                fd.update(kind="procfile", path=f"/proc/{outside}/environ", proc_pid=outside,
                          flags=os.O_RDONLY, pos=0)

    copy = edited_copy(image, jobs.home / "procfile", lambda creds: None, to_proc_file)
    for options in ([], ["--user", USER]):
        res = tree_cr.restore(copy, *options, "--pidfile", str(jobs.home / "no.pid"))
        message = tree_cr.assert_error(res, 13)
        assert f"/proc/{outside}/environ names a process that is not in the image" in message
    assert "PASS" not in jobs.lines()


def test_restore_never_raises_a_users_hard_limit(jobs, tmp_path):
    """hpcuser's image edited so that its processes' hard limit of open files is far above the
    restore's own (prlimit gives the restore 1024:2048): they come back with the restore's hard
    limit, which is what a job started by it would get, not the image's (root, which restores,
    could raise it where it holds CAP_SYS_RESOURCE: a user's image never gets more than that),
    a warning says so, and the job runs to its end.  Where root lacks CAP_SYS_RESOURCE (the
    development machine) the kernel refuses the raise anyway: there this passes either way."""

    def edit(proc: dict) -> None:
        for name in proc["rlimits"]:  # RLIMIT_NOFILE, and its old name RLIMIT_OFILE
            if getattr(resource, name, None) == resource.RLIMIT_NOFILE:
                proc["rlimits"][name] = [1024, 1 << 20]

    copy = edited_copy(image_of_user_job(jobs, steps=400), tmp_path / "limits",
                       lambda creds: None, edit)
    pidfile = tmp_path / "restored.pid"
    restore = subprocess.Popen(
        ["prlimit", "--nofile=1024:2048", *cli_argv("restore", "-D", copy, "--pidfile", pidfile)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env())
    try:
        jobs.cr.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip()
                           or restore.poll() is not None, "the restored job's pid")
        limits = Path(f"/proc/{int(pidfile.read_text())}/limits").read_text()
        assert re.search(r"Max open files\s+1024\s+2048\s", limits), limits
    finally:
        _, err = restore.communicate(timeout=TIMEOUT)
    assert restore.returncode == 0, err
    assert "RLIMIT_NOFILE hard limit 1048576 cannot be raised here; kept at 2048" in err, err
    assert counts(jobs.lines()) == list(range(400)) and jobs.lines()[-1] == "PASS"


def test_edited_copy_of_an_image_restores(jobs, tmp_path):
    """The control of the test above: a copy made as edited_copy makes them, unedited, restores
    (plainly: it is hpcuser's) and runs to the end."""
    image = image_of_user_job(jobs, steps=100)
    same = edited_copy(image, tmp_path / "same", lambda creds: None)
    res = subprocess.run(
        cli_argv("restore", "-D", same),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(),
    )
    assert res.returncode == 0, describe(res)
    assert counts(jobs.lines()) == list(range(100)) and jobs.lines()[-1] == "PASS"


def test_program_the_user_may_run_through_a_group(jobs, tmp_path):
    """hpcuser's job runs a program that only members of a supplementary group of hpcuser's
    may run (root's, mode 0750, group SHARED_GROUP: a project's software directory): the
    restore maps it and sets it as the executable with hpcuser's groups, not without them, and
    the job goes on to its end."""
    group = grp.getgrnam(SHARED_GROUP).gr_gid
    assert group in os.getgrouplist(USER, GID)
    os.chown(jobs.counter, 0, group)
    jobs.counter.chmod(0o750)
    for options in ([], ["--user", USER]):
        jobs.log.write_text("")  # a new job: it and hpccr append to these
        jobs.err.write_text("")
        image = image_of_user_job(jobs, steps=100)
        restore = subprocess.run(cli_argv("restore", "-D", image, *options),
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=TIMEOUT, env=cli_env())
        assert restore.returncode == 0, describe(restore)
        assert counts(jobs.lines()) == list(range(100)) and jobs.lines()[-1] == "PASS"


def test_root_image_restored_for_user_fails_cleanly(tree_cr, tmp_path, shared_dir):
    """An image root wrote (0700, root's, of root's processes) cannot be restored --user
    hpcuser: one error line, exit 11 (no traceback, nothing restored)."""
    job = tree_cr.start_job([tree_cr.binaries["tree_counter"], 200, 20])
    job.wait_for("COUNT 3")
    image = shared_dir / "img"
    tree_cr.dump_and_kill(job, image)
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, UID, GID)
    res = tree_cr.restore(image, "--user", USER, "--pidfile", str(home / "no.pid"))
    message = tree_cr.assert_error(res, REFUSED)
    assert f"reading {image}" in message or "which user hpcuser does not" in message
    assert "PASS" not in job.lines() and not pid_alive(job.pid)


def test_supervised_restore_usage_errors(jobs, tree_cr, tmp_path):
    """--interval or --checkpoint-on with -D one image (not a series), or with --detach: a usage
    error (exit 2), and nothing restored."""
    image = image_of_user_job(jobs)
    series = image.parent
    for options in (
        ["-D", image, "--interval", "1s"],
        ["-D", image, "--checkpoint-on", "USR1"],
        ["-D", series, "--detach", "--interval", "1s"],
        ["-D", series, "--detach", "--checkpoint-on", "USR1"],
    ):
        res = tree_cr.run("restore", *options)
        tree_cr.assert_error(res, 2)
    assert counts(jobs.lines()) == list(range(max(counts(jobs.lines())) + 1))
    assert "PASS" not in jobs.lines()


def test_user_needs_root(user_python, jobs):
    """--user is for root: as hpcuser, run --user and restore --user exit 11 and start
    nothing."""
    series = jobs.home / "series"
    for args in (
        ["run", "-D", series, "--checkpoint-on", "USR1", "--user", USER, "--", jobs.counter, 10, 1],
        ["restore", "-D", series, "--user", USER],
    ):
        res = as_user(USER, [user_python, "-m", "hpccr", *map(str, args)])
        assert "Traceback" not in res.stderr, describe(res)
        assert res.returncode == REFUSED, describe(res)
        assert res.stderr.startswith("hpccr: error: "), describe(res)
    assert not jobs.lines() and not series.exists()


def private_dir(shared_dir: Path) -> Path:
    """A directory only root may enter."""
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    return private


def test_restore_opens_the_jobs_files_as_the_owner(jobs, tree_cr, shared_dir, tmp_path):
    """hpcuser's image edited so that the job's stdout is a file only root may write, or its
    program's mappings or its executable (/proc/PID/exe, which hpcuser could read) one only
    root may reach (same size and time, so that only the rights differ): a restore, plain or
    --user hpcuser, opens none of them as root; it fails cleanly (exit code 11, permission
    denied) and the file is untouched."""
    image = image_of_user_job(jobs, steps=100)
    private = private_dir(shared_dir)
    secret = private / "secret"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    program = private / "tree_counter"
    shutil.copy2(jobs.counter, program)

    def to_secret(proc: dict) -> None:
        for fd in proc["fds"]:
            if fd.get("path") == str(jobs.log):
                fd["path"] = str(secret)

    def to_program(proc: dict) -> None:
        for vma in proc["vmas"]:
            if vma.get("path") == str(jobs.counter):
                vma["path"] = str(program)

    def to_executable(proc: dict) -> None:
        if proc["exe"] == str(jobs.counter):
            proc["exe"] = str(program)

    for name, edit, says in (
        ("fd", to_secret, "cannot open it again as uid"),
        ("vma", to_program, f"cannot open mapped file {program}"),
        ("exe", to_executable, f"runs {program}, which user {USER} may not execute: refused"),
    ):
        copy = edited_copy(image, jobs.home / name, lambda creds: None, edit)
        for options in ([], ["--user", USER]):
            res = tree_cr.restore(copy, *options, "--pidfile", str(jobs.home / "no.pid"))
            assert says in tree_cr.assert_error(res, 11)  # permission denied
    assert secret.read_text() == "root's\n"
    assert "PASS" not in jobs.lines()


def set_user_id_copy(program: Path, shared_dir: Path) -> Path:
    """A copy of ``program`` that is root's and set-user-ID, where hpcuser may run it."""
    where = shared_dir / "suid"
    where.mkdir(mode=0o755)
    copy = where / program.name
    shutil.copy2(program, copy)
    copy.chmod(0o4755)
    return copy


def test_restore_refuses_a_set_user_id_program(jobs, tree_cr, shared_dir):
    """hpcuser's image edited so that its processes run a set-user-ID root program (a copy of
    their own, same size and time), their credentials still hpcuser's: restored, they would
    have that program's name, which other programs trust, around memory hpcuser wrote.  A
    restore, plain or --user hpcuser, refuses it (exit 11) before any process exists."""
    image = image_of_user_job(jobs, steps=100)
    program = set_user_id_copy(jobs.counter, shared_dir)

    def to_program(proc: dict) -> None:
        if proc["exe"] == str(jobs.counter):
            proc["exe"] = str(program)

    copy = edited_copy(image, jobs.home / "suid", lambda creds: None, to_program)
    for options in ([], ["--user", USER]):
        res = tree_cr.restore(copy, *options, "--pidfile", str(jobs.home / "no.pid"))
        message = tree_cr.assert_error(res, REFUSED)
        assert f"runs {program}, a set-user-ID program of uid 0: refused for user {USER}" \
            in message, message
    assert "PASS" not in jobs.lines()


def test_checkpoint_of_a_set_user_id_program_is_refused(jobs, shared_dir):
    """hpcuser's job runs a set-user-ID root program (a copy of the counter), so its processes
    have root's effective uid: an image of it, hpcuser's, could not be restored, so USR1's
    checkpoint is refused at the dump and the job runs on untouched, to its end."""
    series = jobs.home / "series"
    jobs.counter = set_user_id_copy(jobs.counter, shared_dir)
    job = jobs.run(150, "-D", series, "--checkpoint-on", "USR1", "--user", USER)
    jobs.wait_count(10, job.pid)
    jobs.cr.wait_until(lambda: catches(job.proc.pid, signal.SIGUSR1), "hpccr's USR1 handler")
    job.proc.send_signal(signal.SIGUSR1)
    failed = f"hpccr: checkpoint {series}/ckpt-0001 failed, the job runs on: "
    jobs.cr.wait_until(lambda: any(line.startswith(failed) for line in jobs.errors()),
                       "the refused checkpoint's message")
    said = next(line for line in jobs.errors() if line.startswith(failed))
    assert f"which user {USER}, whose image it would be, does not" in said, said
    assert job.proc.wait(TIMEOUT) == 0, jobs.log_text()
    assert counts(jobs.lines()) == list(range(150)) and jobs.lines()[-1] == "PASS"
    assert not list(series.glob("ckpt-*"))


def test_restore_for_user_reads_with_the_users_rights(jobs, tree_cr, shared_dir):
    """An image of hpcuser's job, copied where only root may read it: restore --user hpcuser
    reads images with hpcuser's file rights (README), so it cannot read this one and fails
    cleanly, restoring nothing."""
    image = image_of_user_job(jobs, steps=100)
    hidden = private_dir(shared_dir) / "img"
    shutil.copytree(image, hidden)
    pidfile = jobs.home / "hidden.pid"  # where hpcuser may write it
    tree_cr.pidfiles.append(pidfile)
    res = tree_cr.restore(hidden, "--user", USER, "--pidfile", pidfile)
    assert res.returncode != 0, describe(res) + "\nlog:\n" + jobs.log_text()
    tree_cr.assert_error(res, res.returncode)
    assert "PASS" not in jobs.lines()


def running(program: Path, since: int) -> list[int]:
    """The processes started at ``since`` or later that run ``program``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "exe") == str(program):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if started_since(pid, since)]


@pytest.mark.parametrize("command", ["run", "restore"])
def test_pidfile_the_user_cannot_write(jobs, tmp_path, command):
    """--pidfile in a directory only root may write, with --user hpcuser: either hpccr writes
    it and supervises the job, or it fails cleanly (one error line, no traceback) and leaves no
    job running on unsupervised."""
    pidfile = tmp_path / "job.pid"
    if command == "run":
        argv = cli_argv("run", "--user", USER, "--pidfile", pidfile, "--", jobs.counter, 600, 20)
    else:
        series = image_of_user_job(jobs, steps=600).parent
        argv = cli_argv("restore", "-D", series, "--user", USER, "--pidfile", pidfile)
    before, since = len(jobs.errors()), boot_ticks()
    proc = jobs._start(argv)
    jobs.cr.wait_until(lambda: pidfile.exists() or proc.poll() is not None, "pid file or exit")
    if proc.poll() is None:  # written: hpccr supervises the job
        jobs.cr.pidfiles.append(pidfile)
        jobs.cr.wait_until(lambda: pidfile.read_text().endswith("\n"), "the whole pid file")
        assert proc_status(int(pidfile.read_text()))["PPid"] == str(proc.pid)
        return
    errors, problems = jobs.errors()[before:], []
    if any("Traceback" in line for line in errors) or not errors[-1].startswith("hpccr: error"):
        problems.append("not one clean error line:\n" + "\n".join(errors))
    deadline = time.monotonic() + 5  # the job would count on for 12 s without hpccr
    while running(jobs.counter, since) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = running(jobs.counter, since)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if left:
        problems.append(f"the job runs on without hpccr: pids {left}")
    assert not problems, "\n".join(problems)


def test_parent_death_signal_of_a_user_job(jobs):
    """hpcuser's child with a parent-death signal keeps it after restore --user (the kernel
    clears it when credentials change, as the restore's do)."""
    stop_restore_and_pass(jobs, "tree_pdeathsig")


def test_inotify_watches_of_a_user_job(jobs):
    """hpcuser's inotify watches come back for hpcuser, on the same files, with their numbers
    (the restore adds them with hpcuser's file rights)."""
    stop_restore_and_pass(jobs, "fd_inotify", jobs.home)
