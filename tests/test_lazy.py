"""Lazy restore (`hpccr restore --lazy --detach`, engine/lazy.py): the command returns once the
job runs; a filler process places the pages the job touches and streams the others.

Workload: workloads/lazy_memory.c.  HPCCR_PAUSE holds the filler's stream back until the test
lets it go, so that the job's reads, mremap, MADV_DONTNEED and fork surely meet missing pages.
"""

import os
import signal
import subprocess
from pathlib import Path

from harness import TIMEOUT, cli_argv, cli_env, describe

from hpccr.image.pages import pages_name


def restore_lazily(img: Path, tmp_path: Path, pause: Path | None = None,
                   *options: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`hpccr restore --lazy --detach`, its standard error into a file (the filler keeps it
    open until the pages are in): (the command's result, that file)."""
    err = tmp_path / "restore.err"
    env = cli_env()
    if pause is not None:
        env["HPCCR_PAUSE"] = f"lazy-stream:{pause}"
    with open(err, "w") as out:
        res = subprocess.run(cli_argv("restore", "-D", img, "--detach", "--lazy", *options),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out,
                             text=True, timeout=TIMEOUT, env=env)
    return res, err


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid for {pid}")


def test_lazy_restore(cr, tmp_path):
    """The job runs while its pages are held back: every page it reads comes on fault, a
    region it moves, drops or forks with gets the pages it should (those of the image, zeros
    for the dropped half), its signals and stops pass on, and once the stream is let go every
    byte is the image's."""
    workload = cr.start("lazy_memory")
    img, go = tmp_path / "img", tmp_path / "go"
    cr.dump_and_kill(workload, img)
    res, err = restore_lazily(img, tmp_path, go)
    assert res.returncode == 0, describe(res) + err.read_text()
    assert tracer_of(workload.pid), "the job is not held while its pages come"
    os.kill(workload.pid, signal.SIGUSR1)  # passed on by the filler, which traces it
    workload.wait_for("ACTED")
    missing, _, total = workload.values("MISSING")[0].partition(" of ")
    assert missing == total, "pages were in before the job ran: " + workload.output()
    os.kill(workload.pid, signal.SIGSTOP)  # it stops and goes on as if it were not traced
    cr.wait_until(lambda: workload.status()["State"][0] in "tT", "the job to stop")
    os.kill(workload.pid, signal.SIGCONT)
    cr.wait_until(lambda: workload.status()["State"][0] in "RS", "the job to go on")
    go.touch()
    cr.wait_until(lambda: tracer_of(workload.pid) == 0, "the filler to let the job go")
    os.kill(workload.pid, signal.SIGUSR2)
    workload.wait_gone()
    workload.assert_passed()
    assert err.read_text() == ""


def test_lazy_job_dies_with_its_filler(cr, tmp_path):
    """A filler killed with pages still missing takes the job with it (it would read zeros
    where its pages are missing); the image is unchanged and restores again."""
    workload = cr.start("lazy_memory")
    img, go = tmp_path / "img", tmp_path / "go"
    cr.dump_and_kill(workload, img)
    res, err = restore_lazily(img, tmp_path, go)
    assert res.returncode == 0, describe(res) + err.read_text()
    os.kill(tracer_of(workload.pid), signal.SIGKILL)
    workload.wait_gone()
    assert "MISSING" not in workload.output()
    # Its pid free again: the orphan is a zombie until init reaps it.
    cr.wait_until(lambda: not os.path.exists(f"/proc/{workload.pid}"), "its pid free")
    res, err = restore_lazily(img, tmp_path)
    assert res.returncode == 0, describe(res) + err.read_text()
    cr.wait_until(lambda: tracer_of(workload.pid) == 0, "the filler to let the job go")
    os.kill(workload.pid, signal.SIGUSR1)
    workload.wait_for("ACTED")
    os.kill(workload.pid, signal.SIGUSR2)
    workload.wait_gone()
    workload.assert_passed()


def test_lazy_job_killed_when_its_pages_are_corrupt(cr, tmp_path):
    """A pages file that does not match its checksum is found out as it is streamed, after
    the job started: the job is killed (its memory cannot be completed) with one clear line,
    never left running with the wrong pages."""
    workload = cr.start("lazy_memory")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    pages = img / pages_name(workload.pid)
    with open(pages, "r+b") as f:  # one byte (the job, never signalled, touches none)
        f.seek(os.path.getsize(pages) - (8 << 20))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    res, err = restore_lazily(img, tmp_path)
    assert res.returncode == 0, describe(res) + err.read_text()
    workload.wait_gone()
    assert "PASS" not in workload.output()
    lines = err.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("hpccr: error: lazy restore: ") and "checksum" in lines[0], lines
    assert "the restored job was killed" in lines[0], lines


def test_lazy_needs_detach(cr, tmp_path):
    res = cr.run("restore", "-D", tmp_path, "--lazy")
    assert res.returncode == 2 and "--lazy needs --detach" in res.stderr, describe(res)
