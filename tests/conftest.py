"""Fixtures for the engine tests, zdtm-style.

The workloads in ``workloads/`` are small real programs.  Each sets up one piece of state, prints
``PID <pid>`` and ``READY``, stays in that state for a few seconds, then checks the state itself
and prints ``PASS`` or ``FAIL <what>`` (exit status 0 or 1).  A test starts one with its output
going to a regular file, checkpoints it with the hpccr CLI right after READY, restores it and
expects the restored process to print PASS with the same pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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

    wait_until = staticmethod(wait_until)

    @staticmethod
    def assert_error(res: subprocess.CompletedProcess, code: int) -> str:
        """Exit ``code`` with one clear ``hpccr: error:`` line and no traceback; the message."""
        assert "Traceback" not in res.stdout + res.stderr, describe(res)
        assert res.returncode == code, describe(res)
        lines = res.stderr.splitlines()
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
