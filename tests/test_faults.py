"""Faults: nothing lost.  hpccr SIGKILLed at any moment of a dump leaves the job running and
untouched (not stopped, not traced, its memory and signal mask as they were), publishes no
image, and the next dump and restore work.  The kills come at named points (HPCCR_FAULT, see
hpccr/faults.py) and after random delays, of the whole `hpccr dump` process group."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from harness import (
    TIMEOUT,
    cli_argv,
    cli_env,
    describe,
    pid_alive,
    restore_killed_after,
    wait_until,
)

from hpccr.engine import netlock
from hpccr.image.store import ImageReader

MIB = 64
# (point, N): the N-th time hpccr reaches it.  "enter" and "settle" are the two ptrace calls
# around a thread's switch to and from its trampoline, "take_fd" the moment the job holds the
# userfaultfd hpccr is about to copy, "unmap" the one between the scratch area's removal and the
# leader's return; "write" 4 is the second batch of the job's pages.
POINTS = [("freeze", 1), ("freeze", 2), ("enter", 1), ("enter", 2), ("inject", 1),
          ("inject", 2), ("inject", 7), ("inject", 15), ("inject", 30), ("unmap", 1),
          ("settle", 1), ("settle", 2), ("copy", 1), ("copy", 2), ("write", 1), ("write", 4),
          ("commit", 1)]
# Only in a running dump: its memory snapshot, and its release of the job once the image is
# there.
RUNNING_ONLY = [("take_fd", 1), ("thaw", 1)]
RANDOM_KILLS = 30
PF_EXITING = 0x4  # a task's flags (/proc/PID/stat): it is exiting


class Job:
    """The busy workload, and what a test checks after each interrupted dump."""

    def __init__(self, cr, tmp_path: Path):
        self.progress = tmp_path / "progress"
        self.workload = cr.start("busy", MIB, self.progress, append=True)
        self.pid = self.workload.pid
        self.fds = self.descriptors()
        self.maps = self.mappings()

    def mappings(self) -> str:
        return Path(f"/proc/{self.pid}/maps").read_text()

    def descriptors(self) -> dict[str, str]:
        fds = Path(f"/proc/{self.pid}/fd")
        return {fd.name: os.readlink(fd) for fd in fds.iterdir()}

    def rounds(self) -> int:
        text = self.progress.read_text()
        return int(text) if text.strip() else 0

    def tracers(self) -> set[str]:
        """TracerPid of every thread ("0": none)."""
        tracers = set()
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            status = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            tracers |= {line.split()[1] for line in status.splitlines()
                        if line.startswith("TracerPid:")}
        return tracers

    def killed(self) -> bool:
        """SIGKILL pending or on its way out: a half-built job the kernel killed with its
        killed restorer (PTRACE_O_EXITKILL, sent before the tracer lets go), which can still
        look alive and untraced for a moment."""
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                task = Path(f"/proc/{self.pid}/task/{tid}")
                status = dict(line.split(":", 1) for line in
                              (task / "status").read_text().splitlines())
                if any(int(status[key], 16) >> (signal.SIGKILL - 1) & 1
                       for key in ("SigPnd", "ShdPnd")):
                    return True
                if int((task / "stat").read_text().rsplit(")", 1)[1].split()[6]) & PF_EXITING:
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        return False

    def assert_unharmed(self, what: str) -> None:
        """Alive, every thread neither stopped nor traced, and it goes on (a few rounds more:
        each needs the job's own code to run past wherever it was stopped), with the same
        descriptors (checked after those rounds: a trampoline may still have had one to
        close)."""
        assert pid_alive(self.pid), f"{what}: the job died\n{self.workload.output()}"
        assert self.tracers() == {"0"}, f"{what}: still traced by {self.tracers()}"
        start = self.rounds()
        wait_until(lambda: self.rounds() >= start + 3 or not pid_alive(self.pid),
                   f"{what}: the job to go on")
        assert pid_alive(self.pid), f"{what}: the job died\n{self.workload.output()}"
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] not in "Tt", f"{what}: {tid} stopped"
        assert self.descriptors() == self.fds, f"{what}: its descriptors changed"

    def finish(self) -> None:
        """SIGTERM: the job checks everything once more and must pass."""
        os.kill(self.pid, signal.SIGTERM)
        assert self.workload.wait_exit() == 0, self.workload.output()
        assert self.workload.lines()[-1] == "PASS", self.workload.output()


def _dump(pid: int, img: Path, mode: list[str], fault: str | None = None) -> subprocess.Popen:
    env = cli_env()
    if fault:
        env["HPCCR_FAULT"] = fault
    return subprocess.Popen(cli_argv("dump", pid, "-D", img, *mode), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _next_dump_and_restore(cr, job: Job, img: Path) -> None:
    """After all that, a dump leaving the job running works, the job passes, and so does the
    image restored."""
    res = cr.dump(job.workload, img, "--leave-running")
    assert res.returncode == 0, describe(res)
    assert not list(img.parent.glob(".*.partial-*")), "temporary directories left behind"
    assert job.mappings() == job.maps, "scratch areas of killed dumps left behind"
    job.assert_unharmed("after the last dump")
    job.finish()
    _restore_and_pass(cr, job, img)
    assert job.workload.lines().count("PASS") == 2, job.workload.output()


@pytest.mark.parametrize("mode", [["--leave-running"], []], ids=["running", "kill"])
def test_dump_killed_at_each_point(cr, tmp_path, mode):
    job = Job(cr, tmp_path)
    img = tmp_path / "img"
    for point, n in POINTS + (RUNNING_ONLY if mode else []):
        dump = _dump(job.pid, img, mode, f"{point}:{n}")
        out, err = dump.communicate(timeout=TIMEOUT)
        what = f"{' '.join(mode) or 'kill'} dump killed at {point}:{n}"
        assert dump.returncode == -signal.SIGKILL, f"{what}: exit {dump.returncode}: {err}"
        if point != "thaw":
            assert not img.exists(), f"{what}: an image was published"
        job.assert_unharmed(what)
    _next_dump_and_restore(cr, job, img)


def test_dump_killed_at_random_moments(cr, tmp_path):
    """Killed anywhere, mostly inside the dump (which takes about half a second here), now and
    then after it published its image.  The image directory holds, at every moment, nothing,
    the previous complete image, or a new complete one."""
    job = Job(cr, tmp_path)
    img = tmp_path / "img"
    previous = None
    rng = random.Random(11)
    for i in range(RANDOM_KILLS):
        dump = _dump(job.pid, img, ["--leave-running"])
        try:
            dump.wait(timeout=rng.uniform(0.05, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(dump.pid, signal.SIGKILL)
        dump.communicate(timeout=TIMEOUT)
        current = _contents(img) if img.exists() else None
        if current != previous:
            assert current is not None, f"kill {i}: the previous image is gone"
            reader = ImageReader(img)
            try:
                reader.verify()
            finally:
                reader.close()
            previous = current
        job.assert_unharmed(f"random kill {i}")
    _next_dump_and_restore(cr, job, img)


@pytest.mark.parametrize("mode", [["--leave-running"], []], ids=["running", "kill"])
def test_dump_killed_with_connections_locked(tree_cr, tmp_path, mode):
    """A dump locks the job's TCP connections (netlock.py): killed, it leaves them working all
    the same, its watchdog lifting the lock.  Both ends then check every byte and pass."""
    before = set(netlock.held())
    workload = tree_cr.start(tree_cr.binaries["net_tcp"], "v4", "flight", append=True)
    dump = _dump(workload.pid, tmp_path / "img", mode, "inject:1")
    out, err = dump.communicate(timeout=TIMEOUT)
    assert dump.returncode == -signal.SIGKILL, f"exit {dump.returncode}: {err}"
    wait_until(lambda: set(netlock.held()) <= before, "the dump's network lock to be lifted")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def _contents(img: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in img.iterdir()}


def test_restore_killed_at_random_moments(cr, tmp_path):
    """A restore killed anywhere leaves either nothing (no half-built process with the job's
    pid) or the whole job running; the image is untouched and the next restore works."""
    job = Job(cr, tmp_path)
    img = tmp_path / "img"
    res = cr.dump(job.workload, img)
    assert res.returncode == 0, describe(res)
    job.workload.wait_exit()
    contents = _contents(img)
    rng = random.Random(11)
    outcomes = {"nothing": 0, "restored": 0}
    for i in range(RANDOM_KILLS):
        restore_killed_after(img, rng.uniform(0.05, 1.0))
        wait_until(lambda: job.workload.runs_here() or not pid_alive(job.pid),
                   f"restore killed ({i}): a whole job or none")
        if pid_alive(job.pid) and not job.killed():  # (the restore was reaped: no race)
            job.assert_unharmed(f"restore killed ({i})")
            outcomes["restored"] += 1
            os.kill(job.pid, signal.SIGKILL)
        else:
            outcomes["nothing"] += 1
        # Its pid free again: an orphan killed (or a half-built task the kernel killed with
        # hpccr) is a zombie until init reaps it.
        wait_until(lambda: not os.path.exists(f"/proc/{job.pid}"), f"pid {job.pid} free")
        assert _contents(img) == contents, f"restore killed ({i}): the image changed"
    assert outcomes["nothing"], outcomes  # some kills came before the end of the restore
    _restore_and_pass(cr, job, img)


def _restore_and_pass(cr, job: Job, img: Path) -> None:
    """The image restores, the job goes on and passes when it ends."""
    restored = cr.restore_in_background(img)
    wait_until(lambda: (job.workload.runs_here() and job.tracers() == {"0"})
               or restored.poll() is not None, "the restored job, released")
    assert restored.poll() is None, describe(restored) + str(restored.communicate())
    job.assert_unharmed("restored")
    os.kill(job.pid, signal.SIGTERM)
    out, err = restored.communicate(timeout=TIMEOUT)
    assert restored.returncode == 0, f"{out}\n{err}\n{job.workload.output()}"
    assert job.workload.lines()[-1] == "PASS", job.workload.output()
