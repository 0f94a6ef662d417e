"""Incremental checkpoints: periodic checkpoints of a job (`hpccr run --interval`) save only the
pages written since the previous one (engine/tracking.py), leave the others to it (image/chain.py)
and restore through the chain; every full_every-th is full; --keep keeps what a kept image needs;
a broken chain is refused (13); hpccr killed while it hands a job's memory from its snapshot to its
tracker leaves the job running with its memory as it was.

Workload: workloads/dirty_pages.c SERIES PHASES: phase after phase it writes 5 % (phase 3: 40 %) of
64 MiB and moves, grows, releases and re-maps memory, each time waiting for a newer checkpoint; a
thread writes all the while (into pages a checkpoint copies while the job runs). Once SERIES/go
exists it checks every page against what the phases wrote: PASS, or FAIL at the first wrong page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from harness import TIMEOUT, describe, pid_alive, wait_until

A_PAGES = 16384  # the workload's 64 MiB


def image(path: Path) -> dict:
    return json.loads((path / "image.json").read_text())


def own_pages(path: Path, pid: int = 2) -> int:
    return next(p["nr_pages"] for p in image(path)["processes"] if p["pid"] == pid)


def chain_of(series: Path, name: str) -> list[str]:
    """The image `name` and those it leaves pages to, down to a full one."""
    names = [name]
    while (parent := image(series / names[-1]).get("parent")) is not None:
        names.append(parent["image"])
    return names


def latest(series: Path) -> str:
    link = series / "latest"
    return os.readlink(link) if link.is_symlink() else ""


def start(tree_cr, series: Path, phases: int, *options: str, env: dict | None = None):
    series.mkdir()
    program = tree_cr.binaries["dirty_pages"]
    return tree_cr.start_job([program, series, phases], "-D", series, "--interval", "1s",
                             *options, env=env)


def wait_for_checkpoint_after(tree_cr, job, series: Path, line: str) -> str:
    """The name of a checkpoint committed after the job printed `line`."""
    job.wait_for(line, timeout=TIMEOUT)
    before = latest(series)
    tree_cr.wait_until(lambda: latest(series) != before or not job.alive(),
                       f"a checkpoint after '{line}'")
    assert job.alive(), job.output()
    return latest(series)


def kill_job(job) -> None:
    pids = [job.pid, *map(int, Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text()
                                .split())]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.proc.wait(timeout=TIMEOUT)
    wait_until(lambda: not any(map(pid_alive, pids)), "the job gone")


def restore_and_pass(tree_cr, job, series: Path) -> None:
    (series / "go").touch()
    res = tree_cr.restore(series)
    assert res.returncode == 0, describe(res) + "\n" + job.output()
    lines = job.lines()
    assert lines[-1] == "PASS", job.output()


def test_pages_shared_with_a_child_since_fork_then_written(tree_cr, tmp_path):
    """A child forked before the first checkpoint shares the job's 64 MiB with it: saved once,
    with the job's pages. As the phases write the job's copy, the child keeps the old pages,
    which it no longer shares: its own increments must save them (the tracker vouches for
    them, but the image before holds none of them for the child). Restored through the chain,
    the child checks them; a page left to an image that does not hold it FAILs."""
    series = tmp_path / "series"
    series.mkdir()
    job = tree_cr.start_job([tree_cr.binaries["dirty_pages"], series, 3, "fork"], "-D", series,
                            "--interval", "1s")
    name = wait_for_checkpoint_after(tree_cr, job, series, "phase 3")
    kill_job(job)
    assert len(chain_of(series, name)) > 2, chain_of(series, name)
    restore_and_pass(tree_cr, job, series)


@pytest.mark.parametrize("compress", ["no", "yes"])
def test_periodic_checkpoints_are_incremental_and_restore(tree_cr, tmp_path, compress):
    """After a full first checkpoint, each one saves little more than the pages written since
    the one before (5 % of 64 MiB a phase, the thread's few); the newest, restored through its
    chain, has every page as the job had it: PASS (a page not brought back from a parent, or
    one taken from a parent though written since, is a FAIL or a crash).  Compressed too: the
    pages a restore takes from a parent are read through its zstd stream, skipping the others."""
    series = tmp_path / "series"
    job = start(tree_cr, series, 5, "--keep", "2", env={"HPCCR_COMPRESS": compress})
    name = wait_for_checkpoint_after(tree_cr, job, series, "phase 5")
    kill_job(job)

    chain = chain_of(series, name)
    assert len(chain) > 1, f"{name} is not incremental"
    full = series / chain[-1]
    assert own_pages(full) >= A_PAGES, "the full image lacks the job's memory"
    assert own_pages(series / name) <= own_pages(full) // 4, (
        f"{name} saved {own_pages(series / name)} pages of {own_pages(full)}")
    for link in chain:
        assert (series / link / "checksums").exists(), f"{link}, needed by {name}, is gone"
        pages = "pages-2.img.zst" if compress == "yes" else "pages-2.img"
        assert (series / link / pages).exists(), sorted(os.listdir(series / link))
    res = tree_cr.run("show", series / name)
    assert res.returncode == 0, describe(res)
    assert "incremental" in res.stdout and chain[-1] in res.stdout, res.stdout

    restore_and_pass(tree_cr, job, series)


def test_every_nth_is_full_keep_keeps_chains_and_a_broken_chain_is_refused(tree_cr, tmp_path):
    """full_every = 3: no chain is longer than 3 images. --keep 1 keeps the newest image and
    the images it leaves pages to, nothing else. The final checkpoint (SIGTERM, the job
    killed) is incremental too and restores. A parent removed, or replaced by another image,
    is a broken chain: the restore fails with 13 before any process exists."""
    series = tmp_path / "series"
    job = start(tree_cr, series, 2, "--keep", "1", "--checkpoint-on", "TERM",
                env={"HPCCR_FULL_EVERY": "3"})
    job.wait_for("phase 2", timeout=TIMEOUT)
    tree_cr.wait_until(lambda: latest(series) >= "ckpt-0007" or not job.alive(),
                       "seven checkpoints")
    os.kill(job.proc.pid, signal.SIGTERM)  # hpccr run: a last checkpoint, then the job killed
    assert job.proc.wait(timeout=TIMEOUT) != 0
    wait_until(lambda: not pid_alive(job.pid), "the job gone")

    name = latest(series)
    chain = chain_of(series, name)
    assert len(chain) <= 3, chain
    kept = sorted(p.name for p in series.glob("ckpt-*"))
    assert kept == sorted(chain), f"kept {kept}, the chain of {name} is {chain}"
    assert any(len(chain_of(series, n)) > 1 for n in kept), "no incremental image"

    parent = series / chain[1] if len(chain) > 1 else None
    if parent is not None:  # the newest is incremental: break its chain, then mend it
        aside = tmp_path / "aside"
        parent.rename(aside)
        res = tree_cr.restore(series)
        assert "chain is broken" in tree_cr.assert_error(res, 13), describe(res)
        shutil.copytree(series / name, parent)  # a complete image, but another one
        res = tree_cr.restore(series)
        assert "chain is broken" in tree_cr.assert_error(res, 13), describe(res)
        shutil.rmtree(parent)
        aside.rename(parent)
    assert "PASS" not in job.lines()
    restore_and_pass(tree_cr, job, series)


def test_hpccr_killed_while_handing_memory_to_its_tracker(tree_cr, tmp_path):
    """hpccr run SIGKILLed in the middle of its first checkpoint, with the job frozen again
    while its memory goes from the snapshot to the tracker: the job runs on, neither traced
    nor stopped, and every page it checks is as it wrote it."""
    series = tmp_path / "series"
    job = start(tree_cr, series, 3, env={"HPCCR_FAULT": "hand_over"})
    assert job.proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, job.output()
    assert job.alive(), job.output()
    workload = int(Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()[0])
    for tid in os.listdir(f"/proc/{workload}/task"):
        status = Path(f"/proc/{workload}/task/{tid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status)
        assert fields["TracerPid"].strip() == "0", f"thread {tid} still traced"
        assert fields["State"].split()[0] not in "tT", f"thread {tid} stopped"
    (series / "go").touch()
    job.wait_for("PASS", timeout=TIMEOUT)
