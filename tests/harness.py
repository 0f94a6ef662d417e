"""The harness of the engine tests, zdtm-style (its fixtures are registered by conftest.py;
shared_dir and user_python by the test modules that use them).

The workloads in ``workloads/`` are small real programs.  Each sets up one piece of state, prints
``PID <pid>`` and ``READY``, stays in that state for a few seconds, then checks the state itself
and prints ``PASS`` or ``FAIL <what>`` (exit status 0 or 1).  A test starts one with its output
going to a regular file, checkpoints it with the hpccr CLI right after READY, restores it and
expects the restored process to print PASS with the same pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKLOADS = TESTS / "workloads"
CFLAGS = ["-O2", "-Wall", "-pthread"]
TIMEOUT = 60  # seconds: the bound of every CLI call and every wait


@pytest.fixture(scope="session")
def workload_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every ``workloads/*.c`` compiled once per session; any compiler output is a failure."""
    out = tmp_path_factory.mktemp("workloads")
    builds = {
        src.stem: subprocess.Popen(
            ["gcc", *CFLAGS, "-o", str(out / src.stem), str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in sorted(WORKLOADS.glob("*.c"))
    }
    for name, proc in builds.items():
        output, _ = proc.communicate(timeout=TIMEOUT)
        if proc.returncode or output:
            pytest.fail(f"gcc {name}.c failed or warned:\n{output}")
    return {name: out / name for name in builds}


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie; a process whose main thread has exited
    while other threads run on (shown as a zombie too) is alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X") or threads > 1


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict: ``{"Uid": "1000\\t1000\\t1000\\t1000", ...}``."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def cli_argv(*args: object) -> list[str]:
    """The command line of ``hpccr ARGS``, run as a module of this checkout."""
    return [sys.executable, "-m", "hpccr", *map(str, args)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def restore_killed_after(img: Path, delay: float, *options: object) -> None:
    """``hpccr restore -D IMG OPTIONS`` in a process group of its own, SIGKILLed with that group
    after `delay` seconds unless it ended before."""
    restore = subprocess.Popen(cli_argv("restore", "-D", img, *options), env=cli_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        restore.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(restore.pid, signal.SIGKILL)
    restore.communicate(timeout=TIMEOUT)


def describe(res: subprocess.CompletedProcess) -> str:
    return f"{res.args}: exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"


@dataclass
class Workload:
    """A started workload; after a restore the same pid (and log) is the restored process."""

    argv: list[str]
    log: Path
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.output().splitlines()

    def values(self, key: str) -> list[str]:
        """What follows ``KEY `` on each line that starts with it."""
        return [line[len(key) + 1 :] for line in self.lines() if line.startswith(key + " ")]

    def wait_for(self, line: str, timeout: float = 30) -> None:
        """Wait until ``line`` appears; fail early if the process died first."""
        deadline = time.monotonic() + timeout
        while True:
            alive = pid_alive(self.pid)
            if line in self.lines():
                return
            if not alive:
                pytest.fail(f"{self.argv[0]} ended before printing {line!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {line!r} from {self.argv[0]} in {timeout} s:\n{self.output()}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def status(self) -> dict[str, str]:
        return proc_status(self.pid)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """Exit status of the original process (our child)."""
        return self.proc.wait(timeout=timeout)

    def wait_gone(self, timeout: float = TIMEOUT) -> None:
        """Wait until the pid no longer runs (a restored process that is not our child)."""
        wait_until(lambda: not pid_alive(self.pid), f"pid {self.pid} to end", timeout)

    def assert_passed(self, passes: int = 1) -> None:
        """The log ends with PASS (``passes`` in all) and every PID line shows the first pid."""
        lines = self.lines()
        assert lines and lines[-1] == "PASS", self.output()
        assert lines.count("PASS") == passes, self.output()
        assert set(self.values("PID")) == {str(self.pid)}, self.output()

    def assert_untouched(self) -> None:
        """Still running on its own: neither stopped nor traced (after a refused dump)."""
        status = proc_status(self.pid)
        assert status["State"][0] in "RSD", status["State"]
        assert status["TracerPid"] == "0", status["TracerPid"]

    def runs_here(self) -> bool:
        """True if our pid still runs this workload (the original or a restored copy)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        argv = [os.fsencode(arg) for arg in self.argv]
        return pid_alive(self.pid) and cmdline.split(b"\0")[:-1] == argv


class Hpccr:
    """Starts workloads and drives the CLI; kills whatever is left when the test ends."""

    def __init__(self, binaries: dict[str, Path], tmp_path: Path) -> None:
        self.binaries = binaries
        self.tmp_path = tmp_path
        self.workloads: list[Workload] = []
        self.background: list[subprocess.Popen] = []

    def start(
        self,
        program: str | Path,
        *args: object,
        append: bool = False,
        stdin: int = subprocess.DEVNULL,
        **popen: object,
    ) -> Workload:
        """Start a workload (a name from workloads/, or an executable's path) and wait for
        READY.  Its stdout and stderr go to one regular file, opened with O_APPEND if asked."""
        if isinstance(program, Path):
            argv = [str(program)]
        elif program.endswith(".py"):
            argv = [sys.executable, str(WORKLOADS / program)]
        else:
            argv = [str(self.binaries[program])]
        log = self.tmp_path / f"{Path(argv[-1]).name}.log"
        argv += [str(a) for a in args]
        with open(log, "ab" if append else "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=out, stderr=out, start_new_session=True, **popen
            )
        workload = Workload(argv, log, proc)
        self.workloads.append(workload)
        workload.wait_for("READY")
        return workload

    def run(self, *args: object) -> subprocess.CompletedProcess:
        """``hpccr ARGS`` from this checkout, stdin /dev/null, output captured as text."""
        return subprocess.run(
            cli_argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=cli_env(),
        )

    def dump(self, workload: Workload, img: Path, *options: str) -> subprocess.CompletedProcess:
        return self.run("dump", workload.pid, "-D", img, *options)

    def restore(self, img: Path, *options: str) -> subprocess.CompletedProcess:
        return self.run("restore", "-D", img, *options)

    def restore_in_background(self, img: Path, stdin: int = subprocess.DEVNULL) -> subprocess.Popen:
        """``hpccr restore`` left running (for tests that talk to the restored process)."""
        proc = subprocess.Popen(
            cli_argv("restore", "-D", img),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.background.append(proc)
        return proc

    def dump_and_kill(self, workload: Workload, img: Path) -> subprocess.CompletedProcess:
        """A default dump: it succeeds and the original is killed (we reap it)."""
        res = self.dump(workload, img)
        assert res.returncode == 0, describe(res)
        assert workload.proc.wait(timeout=10) < 0, "the dumped process was not killed"
        assert not pid_alive(workload.pid)
        assert "PASS" not in workload.lines()
        return res

    def restore_and_pass(self, workload: Workload, img: Path, passes: int = 1) -> None:
        """A foreground restore: it exits 0 with the restored process, which printed PASS."""
        res = self.restore(img)
        assert res.returncode == 0, describe(res) + "\nlog:\n" + workload.output()
        workload.assert_passed(passes)

    def checkpoint_restart(self, workload: Workload, img: Path) -> None:
        self.dump_and_kill(workload, img)
        self.restore_and_pass(workload, img)

    def leave_running_then_restore(self, workload: Workload, img: Path) -> None:
        """A --leave-running dump: the original runs on and passes (the dump consumed and
        disturbed nothing), then the image restores and passes too.  Start the workload with
        append=True, so that both runs' lines stay in its log."""
        res = self.dump(workload, img, "--leave-running")
        assert res.returncode == 0, res.stderr
        assert workload.wait_exit() == 0, workload.output()
        workload.assert_passed()
        self.restore_and_pass(workload, img, passes=2)

    wait_until = staticmethod(wait_until)

    @staticmethod
    def assert_error(res: subprocess.CompletedProcess, code: int) -> str:
        """Exit ``code`` with one clear ``hpccr: error:`` line (warnings aside) and no
        traceback; the message."""
        assert "Traceback" not in res.stdout + res.stderr, describe(res)
        assert res.returncode == code, describe(res)
        lines = [line for line in res.stderr.splitlines()
                 if not line.startswith("hpccr: warning: ")]
        assert len(lines) == 1 and lines[0].startswith("hpccr: error: "), describe(res)
        return lines[0]

    def cleanup(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for workload in self.workloads:
            if workload.proc.poll() is None:
                workload.proc.kill()
                workload.proc.wait(timeout=10)
            if workload.runs_here():  # a restored copy, not our child
                os.kill(workload.pid, signal.SIGKILL)


@pytest.fixture
def cr(workload_binaries: dict[str, Path], tmp_path: Path):
    """The harness of one test; every process it started is killed at the end."""
    harness = Hpccr(workload_binaries, tmp_path)
    yield harness
    harness.cleanup()


# Process trees and `hpccr run` jobs (test_trees.py, test_run.py).

JOB_PID = "hpccr run: job pid"  # hpccr run's line on stderr, followed by the pid


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that ``/proc/PID/stat`` gives start times in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def started_since(pid: int, ticks: int) -> bool:
    """True if ``pid`` runs and was created at ``ticks`` or later: ours, not a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X") and int(fields[19]) >= ticks


def tree_of(pid: int) -> list[int]:
    """``pid`` and every descendant (zombies included), parents first."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop(0)
        found.append(parent)
        for task in sorted(Path(f"/proc/{parent}/task").glob("*")):
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # that thread or process ended meanwhile
    return found


def ns_pids(pid: int) -> list[int]:
    """``pid`` as every pid namespace it is in sees it, outermost first (the NSpid line)."""
    return [int(p) for p in proc_status(pid)["NSpid"].split()]


@dataclass
class Job(Workload):
    """A command that ``hpccr run`` runs as a job.  ``proc`` is hpccr run, ``pid`` the job's pid 1
    (hpccr-init) as seen here, and the command inside is pid 2 of the job's namespace: the pid its
    PID lines show, before and after a restore."""

    errors: Path | None = None  # hpccr run's stderr, where the job pid line is
    job_pid: int = 0
    since: int = 0  # boot_ticks() before hpccr run started

    @property
    def pid(self) -> int:
        return self.job_pid

    def assert_passed(self, passes: int = 1) -> None:
        lines = self.lines()
        assert lines and lines[-1] == "PASS", self.output()
        assert lines.count("PASS") == passes, self.output()
        assert set(self.values("PID")) == {"2"}, self.output()

    def runs_here(self) -> bool:
        """True while our job (not some later user of its pid) runs as a pid namespace's init."""
        try:
            return started_since(self.pid, self.since) and ns_pids(self.pid)[-1] == 1
        except (FileNotFoundError, ProcessLookupError):
            return False


class TreeHarness(Hpccr):
    """``cr`` for process trees and jobs.  It also remembers the pids of every tree it started
    (at READY) and the pid file of every restore, and at the end kills whichever of them still
    run, original or restored; killing a job's pid 1 ends its whole pid namespace."""

    def __init__(self, binaries: dict[str, Path], tmp_path: Path) -> None:
        super().__init__(binaries, tmp_path)
        self.since = boot_ticks()
        self.trees: dict[int, list[int]] = {}  # root pid -> every pid of its tree at READY
        self.pidfiles: list[Path] = []

    def start(self, program: str | Path, *args: object, **kwargs) -> Workload:
        workload = super().start(program, *args, **kwargs)
        self.trees[workload.pid] = tree_of(workload.pid)
        return workload

    def start_job(
        self,
        command: list[object],
        *options: object,
        stdin: int = subprocess.DEVNULL,
        stderr: Path | None = None,
        ready: bool = True,
        wrap: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Job:
        """``hpccr run OPTIONS -- COMMAND`` (under the command ``wrap``, with ``env`` added to
        the environment).  Its stdout goes to a log opened with O_APPEND (so that restored
        copies of the job add to it), its stderr there too or to ``stderr``.  Waits until hpccr
        run names the job's pid and, if ``ready``, until the job prints READY."""
        argv = [*wrap, *cli_argv("run", *options, "--", *command)]
        log = self.tmp_path / f"job{len(self.workloads)}.log"
        since = boot_ticks()
        with open(log, "ab") as out, open(stderr or log, "ab") as err:
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=out, stderr=err, start_new_session=True,
                env={**cli_env(), **(env or {})}
            )
        job = Job(argv, log, proc, errors=stderr or log, since=since)
        self.workloads.append(job)

        def named() -> list[str]:
            lines = job.errors.read_text(errors="replace").splitlines()
            return [line.split()[-1] for line in lines if line.startswith(JOB_PID + " ")]

        wait_until(lambda: named() or proc.poll() is not None, "hpccr run to start the job")
        if named():
            job.job_pid = int(named()[0])
        elif ready:
            pytest.fail(
                f"hpccr run ended with {proc.returncode} before starting the job:\n"
                + job.errors.read_text(errors="replace")
            )
        if ready:
            job.wait_for("READY")
        return job

    def restore(self, img: Path, *options: str) -> subprocess.CompletedProcess:
        """``hpccr restore``, with a pid file (unless given) so that the end of the test finds
        what it restored even if it outlived a failed or timed-out restore."""
        if "--pidfile" not in options:
            pidfile = self.tmp_path / f"restore{len(self.pidfiles)}.pid"
            self.pidfiles.append(pidfile)
            options = (*options, "--pidfile", str(pidfile))
        return super().restore(img, *options)

    def start_restore(self, img: Path, wrap: tuple[str, ...] = (),
                      env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """A foreground ``hpccr restore`` (under ``wrap``, with ``env`` added) left running in
        the background, and its pid file."""
        pidfile = self.tmp_path / f"restore{len(self.pidfiles)}.pid"
        self.pidfiles.append(pidfile)
        proc = subprocess.Popen(
            [*wrap, *cli_argv("restore", "-D", img, "--pidfile", pidfile)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**cli_env(), **(env or {})},
        )
        self.background.append(proc)
        return proc, pidfile

    def dump_and_kill(self, workload: Workload, img: Path) -> subprocess.CompletedProcess:
        """A default dump of a whole tree or job: it succeeds and every process of it is gone."""
        if not isinstance(workload, Job):
            res = super().dump_and_kill(workload, img)
            # The tree as it started, and as the image has it (children come and go).
            dumped = json.loads((Path(img) / "image.json").read_text())["processes"]
            tree = sorted(set(self.trees[workload.pid]) | {p["pid"] for p in dumped})
            wait_until(lambda: not any(map(pid_alive, tree)), f"the dumped tree {tree} killed", 10)
            # Orphans are reaped by pid 1, in its own time; a restore needs their pids free.
            wait_until(
                lambda: not any(Path(f"/proc/{pid}").exists() for pid in tree),
                f"the dumped tree {tree} reaped",
            )
            return res
        res = self.dump(workload, img)
        assert res.returncode == 0, describe(res)
        assert workload.proc.wait(timeout=10) == 128 + signal.SIGKILL, "the job was not killed"
        assert not pid_alive(workload.pid)
        assert "PASS" not in workload.lines()
        return res

    def cleanup(self) -> None:
        super().cleanup()
        pids = {pid for tree in self.trees.values() for pid in tree}
        for pidfile in self.pidfiles:
            text = pidfile.read_text() if pidfile.exists() else ""
            if text.strip().isdigit():
                pids.add(int(text))
        ours = [pid for pid in sorted(pids) if started_since(pid, self.since)]
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(map(pid_alive, ours)), f"the end of {ours}", timeout=10)


@pytest.fixture
def tree_cr(workload_binaries: dict[str, Path], tmp_path: Path):
    """The harness of one tree or job test; every process it started is killed at the end."""
    harness = TreeHarness(workload_binaries, tmp_path)
    yield harness
    harness.cleanup()


# Jobs of another user (test_run_user.py, test_agent.py).

USER = "hpcuser"  # an ordinary user, made by testbed.cluster.ensure_user (tests/conftest.py)


def as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` run as ``user`` (no PAM session, nothing captured but the output)."""
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=TIMEOUT
    )


def make_user_python(directory: Path, user: str = USER) -> str:
    """A Python that ``user`` can run and that imports this checkout's hpccr: the checkout's own
    venv if the user can run it; otherwise (its interpreter lives where only root may enter, like
    a pyenv in /root) a venv of the system's Python in ``directory`` that imports the checkout's
    packages — same code, another interpreter (as tests/slurm/hpccr_site.py does for hpccr)."""
    probe = ["-c", "import hpccr.slurm.agent, hpccr.native"]
    own = str(REPO / ".venv" / "bin" / "python")
    if as_user(user, [own, *probe]).returncode == 0:
        return own
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip(f"no Python that {user} can run hpccr with")
    venv = directory / "uservenv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    own_site = next((venv / "lib").glob("python3*/site-packages"))
    (own_site / "hpccr-checkout.pth").write_text(
        f"{REPO}\nimport site; site.addsitedir({str(site_packages)!r})\n"
    )
    python = str(venv / "bin" / "python")
    res = as_user(user, [python, *probe])
    if res.returncode != 0:
        pytest.skip(f"{user} cannot import hpccr from {REPO}: {res.stderr}")
    return python


@pytest.fixture(name="shared_dir")
def shared_dir_fixture():
    """A temporary directory every user can enter (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="hpccr-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", name="user_python")
def user_python_fixture():
    """A Python that hpcuser can run hpccr's modules with (see make_user_python)."""
    directory = Path(tempfile.mkdtemp(prefix="hpccr-userpy-"))
    directory.chmod(0o755)
    try:
        yield make_user_python(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
