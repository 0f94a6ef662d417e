"""Threads and registers: every thread comes back with its tid, its name and all its registers,
including the vector state only the xstate regset holds (zmm16-31, k0-7, AMX tiles).

Threads keep their scheduling too: CPU affinity, nice value and policy.

Workloads: workloads/regs.c (4 threads, AVX-512 or AVX), workloads/amx.c (2 threads, AMX tiles),
workloads/sched.c (3 threads, each with its own CPU mask, nice value and policy),
workloads/thread_leader_exit.c (3 workers run on after main's pthread_exit, with a heap and a
pipe), workloads/thread_churn.c (threads created and joined all the time).
"""

import json
import subprocess
from pathlib import Path

import pytest

CPU_FLAGS = set(
    next(
        line.split(":", 1)[1].split()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    )
)
needs_amx = pytest.mark.skipif("amx_tile" not in CPU_FLAGS, reason="this CPU has no AMX tiles")


def test_threads_without_checkpoint(cr):
    workload = cr.start("regs")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_threads_registers(cr, tmp_path):
    workload = cr.start("regs")
    if {"avx512f", "avx512bw"} <= CPU_FLAGS:
        assert workload.values("MODE") == ["avx512"]
    tids = workload.values("TIDS")
    assert tids[0].split()[0] == str(workload.pid)
    cr.checkpoint_restart(workload, tmp_path / "img")
    assert workload.values("TIDS") == tids * 2


def test_scheduling_of_each_thread(cr, tmp_path):
    workload = cr.start("sched")
    cr.checkpoint_restart(workload, tmp_path / "img")


def test_threads_leave_running(cr, tmp_path):
    """A dump that leaves the process running must not disturb any thread's registers."""
    workload = cr.start("regs", append=True)
    cr.leave_running_then_restore(workload, tmp_path / "img")


def test_threads_leave_stopped(cr, tmp_path):
    """--leave-stopped: every thread stays stopped (no PASS while it should have finished);
    killed, the process is restored from the image."""
    workload = cr.start("regs")
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-stopped")
    assert res.returncode == 0, res.stderr
    tasks = Path(f"/proc/{workload.pid}/task")

    def all_stopped() -> bool:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        return len(states) == 4 and set(states) == {"T"}

    cr.wait_until(all_stopped, "every thread to be stopped", timeout=10)
    assert workload.status()["TracerPid"] == "0"
    with pytest.raises(subprocess.TimeoutExpired):
        workload.wait_exit(timeout=4)
    assert "PASS" not in workload.lines()
    workload.proc.kill()
    workload.wait_exit()
    cr.restore_and_pass(workload, img)


def test_show_lists_the_threads(cr, tmp_path):
    """`hpccr show` describes the image: root pid, every tid with the name it had."""
    workload = cr.start("regs")
    tids = [int(t) for t in workload.values("TIDS")[0].split()]
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    res = cr.run("show", img, "--json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["checksums_ok"] is True
    image = shown["image"]
    assert image["root_pid"] == workload.pid
    (process,) = image["processes"]
    assert [(t["tid"], t["comm"]) for t in process["threads"]] == [
        (tid, f"regs-{i}") for i, tid in enumerate(tids)
    ]
    res = cr.run("show", img)
    assert res.returncode == 0, res.stderr
    assert str(workload.pid) in res.stdout


@needs_amx
def test_amx_without_checkpoint(cr):
    workload = cr.start("amx")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@needs_amx
def test_amx_tiles(cr, tmp_path):
    workload = cr.start("amx")
    cr.checkpoint_restart(workload, tmp_path / "img")



def test_main_thread_exited(cr, tmp_path):
    """A process whose main thread has exited while its workers run (pthread_exit in main):
    the image lists the workers only; restored, each worker has its tid, name and stack, the
    leader is a zombie thread again and the process has as many tasks as before (the workload
    checks all of it)."""
    workload = cr.start("thread_leader_exit")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    (proc,) = json.loads((img / "image.json").read_text())["processes"]
    assert proc["main_thread_exited"]
    assert len(proc["threads"]) == 3 and workload.pid not in [t["tid"] for t in proc["threads"]]
    cr.restore_and_pass(workload, img)


def test_main_thread_exited_leave_running(cr, tmp_path):
    """A running dump (its memory snapshot taken through a worker's pidfd) warns of nothing;
    the original passes, then the image restores and passes too."""
    workload = cr.start("thread_leader_exit", append=True)
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    cr.restore_and_pass(workload, img, passes=2)


def test_main_thread_exited_in_a_job(tree_cr, tmp_path):
    """The same process as a job's (hpccr run), restored into a new pid namespace."""
    job = tree_cr.start_job([tree_cr.binaries["thread_leader_exit"]])
    tree_cr.checkpoint_restart(job, tmp_path / "img")


def test_threads_created_during_checkpoints(cr, tmp_path):
    """Two threads create and join short-lived threads all the time: checkpoints catch threads
    being created (a clone in flight while the process is frozen) and exiting; each one
    succeeds and the process runs on, and the last one restores and runs on, every worker's
    result checked."""
    stop = tmp_path / "stop"  # the spawners go on until it exists
    workload = cr.start("thread_churn", stop)
    for i in range(8):
        res = cr.dump(workload, tmp_path / f"img{i}", "--leave-running")
        assert res.returncode == 0, res.stderr
        assert workload.alive(), workload.output()
    cr.dump_and_kill(workload, tmp_path / "img")
    stop.touch()
    cr.restore_and_pass(workload, tmp_path / "img")
