"""Process trees: a workload that forks, dumped by its root pid (restored with its own pids) or
run as a job by `hpccr run` (dumped by the job's pid, restored in a fresh pid namespace).  Every
process of a tree checks its own pid, parent, session and group after the restore, and its own
piece of state; the root PASSes only if all its descendants did.

Workloads: workloads/tree_pipes.c (pipes with data in flight), tree_pipeline.c (the stages of `sh -c
'produce | filter | consume'`), tree_shmem.c (a counter in shared memory under a process-shared
mutex), tree_offset.c FILE (one open file description shared across fork), tree_session.c (setsid
and setpgid), tree_shell_job.c (a program started from a shell, whose session and perhaps group the
shell leads), tree_zombie.c (children not reaped yet), tree_orphan.c [group] (an orphan in the
session, or only the group, of a leader that exited), tree_clone.c (memory, signal handlers and
descriptors shared without threads; without the descriptors, refused), tree_shared_table.c (a
descriptor table and/or cwd shared with the parent), tree_spawner.c (children forked and ending all
the time), tree_stopped.c (a child stopped with SIGSTOP), tree_procfiles.c (files under /proc of its
own processes and threads held open), tree_unshare.c (a child in a namespace or root of its own,
refused).
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import struct
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
    tree_of,
    wait_until,
)

PIPELINE_BYTES = 1 << 20
RANDOM_KILLS = 12  # restores of a tree killed at random moments


@pytest.fixture(params=["pid", "job"])
def mode(request) -> str:
    """`pid`: the tree is dumped by its root pid; `job`: it runs under `hpccr run`."""
    return request.param


def start(cr, mode: str, command: list):
    """Start `command` (the root of a tree) in `mode` and wait for READY."""
    if mode == "job":
        return cr.start_job(command)
    return cr.start(Path(command[0]), *command[1:])


def pipeline(binary: Path, window: float) -> str:
    return (
        f"{binary} produce {PIPELINE_BYTES} {window} | {binary} filter | {binary} consume {window}"
    )


def test_pipes_with_data_in_flight(tree_cr, tmp_path, mode):
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_pipes"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_shell_pipeline(tree_cr, tmp_path, mode):
    """The consumer's checksum after a checkpoint mid-stream is the one of a run without."""
    binary = tree_cr.binaries["tree_pipeline"]
    reference = subprocess.Popen(
        ["sh", "-c", pipeline(binary, 0)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = reference.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(reference.pid, signal.SIGKILL)  # the stages too, if it hung
    assert reference.returncode == 0, err
    expected = out.split()
    assert expected[0] == "SUM" and int(expected[2]) == PIPELINE_BYTES * 2 + PIPELINE_BYTES // 32

    workload = start(tree_cr, mode, ["/bin/sh", "-c", pipeline(binary, 3)])
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    res = tree_cr.restore(tmp_path / "img")
    assert res.returncode == 0, f"{res.stderr}\nlog:\n{workload.output()}"
    lines = workload.lines()
    assert [line.split() for line in lines if line.startswith("SUM ")] == [expected], lines
    assert not [line for line in lines if line.startswith("FAIL")], lines


def test_shared_memory_counter(tree_cr, tmp_path, mode):
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_shmem"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_shared_file_offset(tree_cr, tmp_path, mode):
    records = tmp_path / "records"
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_offset"], records])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
    expected = ["root 0", "child 0", "root 1", "child 1", "root 2"]
    assert records.read_text() == "".join(f"{r:<63}\n" for r in expected)


def test_sessions_and_groups(tree_cr, tmp_path, mode):
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_session"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_group_whose_leader_exited(tree_cr, tmp_path, mode):
    """The later commands of a pipeline whose first command ended: after restore they are in
    that command's group still, and a signal sent to the group reaches them."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_lost_group"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


# How a shell starts a program in the background: `&` without job control (the program stays in
# the shell's group), with it (a group of its own), and nohup'ed by a shell that exits once the
# program is READY, before the dump.
SHELL_JOBS = {
    "shell running": ("{binary} & sleep {TIMEOUT}", False),
    "job control": ("set -m; {binary} & sleep {TIMEOUT}", True),
    "shell gone": ("nohup {binary} & until grep -qx READY {log}; do sleep 0.1; done", False),
}


@pytest.mark.parametrize("how", SHELL_JOBS)
def test_started_from_a_shell(tree_cr, tmp_path, how):
    """The session (and group) of the shell is outside the dumped tree: the restored tree joins
    the restorer's session, and its group unless the program led one, as a shell job would."""
    script, leads_group = SHELL_JOBS[how]
    binary = tree_cr.binaries["tree_shell_job"]
    command = script.format(binary=binary, TIMEOUT=TIMEOUT, log=tmp_path / "bash.log")
    shell = tree_cr.start(Path("/bin/bash"), "-c", command)
    pid = int(shell.values("PID")[0])
    assert ("GROUP LED" in shell.lines()) == leads_group, shell.output()
    if how == "shell gone":
        shell.wait_exit()
    tree = tree_of(pid)  # before the dump: the killed root has no children to list
    res = tree_cr.run("dump", pid, "-D", tmp_path / "img")
    assert res.returncode == 0, describe(res)
    tree_cr.wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in tree),
                       f"the dumped tree {tree} gone (its orphans reaped)")
    res = tree_cr.restore(tmp_path / "img")
    assert res.returncode == 0, describe(res) + "\nlog:\n" + shell.output()
    assert shell.lines()[-1] == "PASS", shell.output()
    assert set(shell.values("PID")) == {str(pid)}, shell.output()
    group = pid if leads_group else os.getpgid(0)
    assert shell.values("PLACE") == [f"{os.getsid(0)} {group}"], shell.output()
    assert (shell.proc.poll() is None) == (how != "shell gone")


def test_program_rebuilt_while_it_ran(tree_cr, tmp_path):
    """The program's file replaced while it runs, as a rebuild replaces it (the old file
    unlinked, a new one written at its path): its /proc/PID/exe names a deleted file.  The
    restored processes run the image's copy of the old program again — /proc/PID/exe is a
    deleted file with the old program's bytes, not the new file — and the counter passes."""
    program = tmp_path / "tree_counter"
    shutil.copy(tree_cr.binaries["tree_counter"], program)
    old = program.read_bytes()
    workload = tree_cr.start(program, 400, 20)
    program.unlink()
    program.write_text("#!/bin/sh\nexit 3\n")
    program.chmod(0o755)
    exe = f"/proc/{workload.pid}/exe"
    assert os.readlink(exe) == f"{program} (deleted)"
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    restore = tree_cr.restore_in_background(tmp_path / "img")

    def runs_the_old_program() -> bool:
        assert restore.poll() is None, restore.communicate()
        with contextlib.suppress(OSError):
            return os.readlink(exe).endswith(" (deleted)") and Path(exe).read_bytes() == old
        return False

    tree_cr.wait_until(runs_the_old_program, "the restored process running the old program")
    out, err = restore.communicate(timeout=TIMEOUT)
    assert restore.returncode == 0, err
    workload.assert_passed()


def test_program_rebuilt_restored_where_tmp_is_noexec(tree_cr, tmp_path):
    """The same, restored with TMPDIR on a file system mounted noexec, as /tmp often is on
    compute nodes: the copy of the old program, which the process maps to run, is made where
    programs may run (/var/tmp here), and the counter passes."""
    program = tmp_path / "tree_counter"
    shutil.copy(tree_cr.binaries["tree_counter"], program)
    workload = tree_cr.start(program, 400, 20)
    program.unlink()
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=64m", "tmpfs", noexec],
                   check=True)
    try:
        res = subprocess.run(cli_argv("restore", "-D", tmp_path / "img"),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=TIMEOUT, env=cli_env() | {"TMPDIR": str(noexec)})
    finally:
        subprocess.run(["umount", "--lazy", noexec], check=True)
    assert res.returncode == 0, describe(res)
    workload.assert_passed()


def test_working_directory_deleted_while_it_ran(tree_cr, tmp_path):
    """The tree's working directory removed while it runs (`rm -r` of its run directory): its
    /proc/PID/cwd names a deleted directory.  The restored processes are in a deleted, empty
    directory again (nothing can be created in it, as in the old one), and the counter
    passes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    workload = tree_cr.start("tree_counter", 400, 20, cwd=run_dir)
    run_dir.rmdir()
    cwd = f"/proc/{workload.pid}/cwd"
    assert os.readlink(cwd) == f"{run_dir} (deleted)"
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    counted = len(workload.values("COUNT"))
    restore = tree_cr.restore_in_background(tmp_path / "img")

    def counting_again() -> bool:
        assert restore.poll() is None, restore.communicate()
        return len(workload.values("COUNT")) > counted + 5

    tree_cr.wait_until(counting_again, "the restored counter counting")
    assert os.readlink(cwd).endswith(" (deleted)")
    with pytest.raises(FileNotFoundError):
        Path(cwd, "new").touch()
    out, err = restore.communicate(timeout=TIMEOUT)
    assert restore.returncode == 0, err
    workload.assert_passed()


def test_proc_files_of_the_tree(tree_cr, tmp_path, mode):
    """/proc/self/stat, /proc/<child>/fd and /proc/<child>/maps, /proc/thread-self/comm: the pids
    come back, so the same paths name the same processes and thread again."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_procfiles"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_proc_file_of_a_process_outside_is_refused(tree_cr, tmp_path):
    """/proc/PID/stat of a process that is not dumped: refused at dump (it would name another
    process, or none, after a restore), and the process runs on."""
    outside = subprocess.Popen(["sleep", str(TIMEOUT)])
    try:
        workload = tree_cr.start("tree_procfiles", "outside", outside.pid)
        message = tree_cr.assert_error(tree_cr.dump(workload, tmp_path / "img"), 14)
        assert f"/proc/{outside.pid}/stat" in message, message
        workload.assert_untouched()
        assert workload.wait_exit() == 0, workload.output()
        workload.assert_passed()
    finally:
        outside.kill()
        outside.wait()


def test_zombies(tree_cr, tmp_path, mode):
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_zombie"]])
    states = [
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        for pid in tree_of(workload.pid)
    ]
    assert states.count("Z") == 2, states
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_children_ending_during_checkpoints(tree_cr, tmp_path, mode):
    """A tree that forks and vforks children ending at once, all the time: every checkpoint
    succeeds though it catches children as they end (a zombie of the frozen root, or gone), and
    the last one restores and runs on."""
    stop = tmp_path / "stop"  # the tree spawns children until it exists
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_spawner"], stop])
    for i in range(8):
        res = tree_cr.dump(workload, tmp_path / f"img{i}", "--leave-running")
        assert res.returncode == 0, describe(res)
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    stop.touch()
    tree_cr.restore_and_pass(workload, tmp_path / "img")


def test_stopped_process(tree_cr, tmp_path, mode):
    """A child stopped by SIGSTOP (a suspended job) is dumped and stays stopped after the
    restore, until its parent sends SIGCONT."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_stopped"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_stopped_process_left_running(tree_cr, tmp_path):
    """A --leave-running dump leaves the stopped child stopped: back in its stop (state T) by
    the time hpccr returns, never seen running in between (its parent checks too)."""
    workload = tree_cr.start(tree_cr.binaries["tree_stopped"], append=True)
    child = tree_of(workload.pid)[1]
    res = tree_cr.dump(workload, tmp_path / "img", "--leave-running")
    assert res.returncode == 0, res.stderr
    state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
    assert state == "T", f"the stopped child is in state {state} after the dump"
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    tree_cr.restore_and_pass(workload, tmp_path / "img", passes=2)


def occupy(cr, pid: int) -> subprocess.Popen:
    """A `sleep` with pid `pid`: ns_last_pid set just before its fork (retried if raced), then
    set back so that the next processes (hpccr restore itself) get pids after the tree's."""
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    before = last_pid.read_text()
    try:
        for _ in range(100):
            last_pid.write_text(str(pid - 1))
            proc = subprocess.Popen(["sleep", str(TIMEOUT)])
            cr.background.append(proc)
            if proc.pid == pid:
                return proc
            proc.kill()
            proc.wait(timeout=10)
    finally:
        last_pid.write_text(before)
    pytest.fail(f"could not start a process with pid {pid}")


def test_pid_taken(tree_cr, tmp_path):
    """A grandchild's pid in use at restore: exit 15 naming it, nothing of the tree left
    running; once the pid is free again the same image restores and PASSes."""
    workload = start(tree_cr, "pid", [tree_cr.binaries["tree_pipes"]])
    tree = tree_cr.trees[workload.pid]
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    taken = tree[-1]
    squatter = occupy(tree_cr, taken)
    message = tree_cr.assert_error(tree_cr.restore(tmp_path / "img"), 15)
    assert re.search(rf"\b{taken}\b", message), message
    assert not [pid for pid in tree if pid != taken and pid_alive(pid)], tree
    assert "PASS" not in workload.lines()
    squatter.kill()
    squatter.wait(timeout=10)
    tree_cr.restore_and_pass(workload, tmp_path / "img")


@pytest.mark.parametrize("table", ["files", "fs", "fsonly"])
def test_tables_shared_with_the_parent(tree_cr, tmp_path, mode, table):
    """A child sharing its parent's descriptor table (files), its cwd and umask (fsonly), or
    both (fs) without being a thread: they share exactly that after the restore (a descriptor
    the child opens is the parent's or not, one the parent closes is gone for the child or not,
    the child's chdir and umask move the parent's or not)."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_shared_table"], table])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
    shown = {"files": "descriptor table", "fs": "descriptor table and cwd and umask",
             "fsonly": "cwd and umask"}[table]
    show = tree_cr.run("show", tmp_path / "img").stdout
    assert re.search(rf"  shares    its {shown} with its parent \d+ \(not as a thread\)", show)


def test_process_sharing_memory_and_signal_handlers(tree_cr, tmp_path, mode):
    """A child made as LinuxThreads made threads (CLONE_VM, CLONE_FS, CLONE_FILES,
    CLONE_SIGHAND): after restore it still shares the parent's memory, signal handlers and
    descriptor table (checked by the workload), with its own pid."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_clone"], "linuxthreads"])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_process_sharing_memory_left_running(tree_cr, tmp_path):
    """A --leave-running dump of it: both run on and pass, then the image restores."""
    workload = tree_cr.start(tree_cr.binaries["tree_clone"], "linuxthreads", append=True)
    tree_cr.leave_running_then_restore(workload, tmp_path / "img")


def forked_pages(img: Path) -> dict[int, tuple[int, int]]:
    """pid -> (its own pages, those it shares with its parent since fork), for each process
    of the image that shares some (docs/image-format.md)."""
    shared = {}
    for proc in json.loads((img / "image.json").read_text())["processes"]:
        runs = img / f"forked-{proc['pid']}.bin"
        if runs.exists():
            pages = sum(nr for _, nr in struct.iter_unpack("<QQ", runs.read_bytes()))
            shared[proc["pid"]] = (proc["nr_pages"], pages)
    return shared


def frames(pid: int, start: int, end: int) -> list[int | None]:
    """The page frame of each page of `pid` in [start, end), None where none is present."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // 4096 * 8)
        entries = struct.iter_unpack("<Q", pagemap.read((end - start) // 4096 * 8))
    return [e & ((1 << 55) - 1) if e >> 63 else None for (e,) in entries]


def same_frames(parent: int, child: int, start: int, end: int) -> int:
    """How many pages in [start, end) are the same page frame in `parent` and `child`."""
    return sum(1 for ours, theirs in zip(frames(parent, start, end), frames(child, start, end),
                                         strict=True)
               if ours is not None and ours == theirs)


def children_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def data_set(pid: int) -> tuple[int, int]:
    """The workload's 16 MiB of anonymous memory in `pid`."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) == 5 and end - start == 16 << 20:
            return start, end
    raise AssertionError(f"no 16 MiB mapping in process {pid}")


def test_pages_shared_since_fork_stay_shared(tree_cr, tmp_path):
    """A root and 3 forked children over 16 MiB (workloads/fork_shared.c): the pages a child
    still shares with its parent since fork are saved once, with the parent's, and after the
    restore they are the same pages again (the same page frames, /proc/PID/pagemap), while each
    process has exactly what it had — a child its own writes and the pages as they were at its
    fork (not the parent's newer ones), the parent its own."""
    go = tmp_path / "go"
    workload = tree_cr.start(tree_cr.binaries["fork_shared"], 3, 16, go)
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    shared = forked_pages(img)
    assert len(shared) == 3, shared
    for own, forked in shared.values():
        assert own < 1024 and forked >= 4000, shared  # 16 MiB: 4096 pages
    show = tree_cr.run("show", img).stdout
    assert show.count(" shared with its parent since fork (saved with the parent's)") == 3
    res = tree_cr.restore(img, "--detach")
    assert res.returncode == 0, describe(res)
    root = workload.pid
    start, end = data_set(root)
    for child in shared:  # all but its own 16 pages and the root's 32 written since
        assert same_frames(root, child, start, end) == 4096 - 16 - 32, f"child {child}"
    go.touch()
    workload.wait_for("PASS", timeout=TIMEOUT)


def test_pages_shared_since_fork_by_workers_and_their_helpers(tree_cr, tmp_path):
    """The pool again, each worker with a helper it forked, which leads a process group of its
    own (`fork_shared -n`): the helpers share pages with their workers, the workers with the
    root, and after the restore each pair holds the same page frames again."""
    go = tmp_path / "go"
    workload = tree_cr.start(tree_cr.binaries["fork_shared"], "-n", 3, 16, go)
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    shared = forked_pages(img)
    assert len(shared) == 6, shared
    res = tree_cr.restore(img, "--detach")
    assert res.returncode == 0, describe(res)
    root = workload.pid
    start_, end = data_set(root)
    workers = [pid for pid in children_of(root) if pid in shared]
    assert len(workers) == 3, (workers, shared)
    for worker in workers:
        assert same_frames(root, worker, start_, end) == 4096 - 16 - 32, f"worker {worker}"
        (helper,) = children_of(worker)
        assert os.getpgid(helper) == helper
        assert same_frames(worker, helper, start_, end) == 4096 - 16, f"helper {helper}"
    go.touch()
    workload.wait_for("PASS", timeout=TIMEOUT)


def test_restore_of_a_pool_killed_at_random_moments(tree_cr, tmp_path):
    """hpccr killed at any moment of the restore of a pool whose workers fork helpers (forked by
    their parents' stubs, their descriptors held by donors meanwhile): either the whole tree runs
    or nothing of its session is left, no donor either; then it restores and passes."""
    go = tmp_path / "go"  # a tree restored waits for it: whole, until it is killed
    workload = tree_cr.start(tree_cr.binaries["fork_shared"], "-n", 2, 16, go, append=True)
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    tree = set(tree_cr.trees[workload.pid])
    rng = random.Random(5)
    outcomes = {"nothing": 0, "restored": 0}
    for i in range(RANDOM_KILLS):
        restore_killed_after(img, rng.uniform(0.02, 0.3), "--detach")
        wait_until(lambda: set(session_members(workload.pid)) in (set(), tree),
                   f"restore killed ({i}): the whole tree or nothing of it")
        if session_members(workload.pid):
            outcomes["restored"] += 1
            for pid in tree:
                os.kill(pid, signal.SIGKILL)  # waiting for `go`: it cannot have ended
        else:
            outcomes["nothing"] += 1
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in tree),
                   f"restore killed ({i}): the tree's pids free")
    assert outcomes["nothing"], outcomes  # some kills came before the end of the restore
    go.touch()
    tree_cr.restore_and_pass(workload, img)


@pytest.mark.parametrize(("fault", "whole"), [("spawned", False), ("carried:1", False),
                                              ("carried:3", False), ("release:2", True)])
def test_restore_of_a_pool_killed_midway(tree_cr, tmp_path, fault, whole):
    """hpccr killed at named points of the restore of that pool (hpccr/faults.py): once every
    task (and donor) exists, as a worker or helper has taken its descriptors from its donor:
    nothing of its session is left; between two processes let run: the whole tree runs."""
    go = tmp_path / "go"
    workload = tree_cr.start(tree_cr.binaries["fork_shared"], "-n", 2, 16, go, append=True)
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    tree = set(tree_cr.trees[workload.pid])
    restore = subprocess.run(cli_argv("restore", "-D", img, "--detach"),
                             env={**cli_env(), "HPCCR_FAULT": fault}, stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=TIMEOUT)
    assert restore.returncode == -signal.SIGKILL, describe(restore)
    expected = tree if whole else set()
    wait_until(lambda: set(session_members(workload.pid)) == expected,
               "the whole tree" if whole else "nothing of the tree")
    for pid in expected:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in tree),
               "the tree's pids free")
    go.touch()
    tree_cr.restore_and_pass(workload, img)


def test_restore_killed_before_its_tasks_are_seized(tree_cr, tmp_path):
    """hpccr killed once every task of a tree exists but before it has seized them (a shell and
    the commands it started, each task forked by the restorer): none of them is left, and the
    next restore works."""
    workload = tree_cr.start(Path("/bin/bash"), "-c",
                             f"sleep {TIMEOUT} & sleep {TIMEOUT} & echo READY; wait")
    tree = set(tree_of(workload.pid))
    assert len(tree) == 3, tree
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    restore = subprocess.run(cli_argv("restore", "-D", img, "--detach"),
                             env={**cli_env(), "HPCCR_FAULT": "spawned"},
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    assert restore.returncode == -signal.SIGKILL, describe(restore)
    wait_until(lambda: not session_members(workload.pid), "nothing of the tree")
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in tree),
               "the tree's pids free")
    res = tree_cr.restore(img, "--detach")
    assert res.returncode == 0, describe(res)
    assert set(session_members(workload.pid)) == tree


def session_members(sid: int) -> list[int]:
    """The processes of session `sid` that have not ended (zombies left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if stat[0] != "Z" and int(stat[3]) == sid:
                members.append(int(entry))
    return members


def test_pages_shared_since_fork_left_running(tree_cr, tmp_path):
    """The same pool dumped with --leave-running (its pages copied while it runs on): it runs
    on and passes, then the image restores and passes too."""
    workload = tree_cr.start(tree_cr.binaries["fork_shared"], 3, 16, append=True)
    img = tmp_path / "img"
    res = tree_cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, describe(res)
    assert all(forked >= 4000 for _, forked in forked_pages(img).values())
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    tree_cr.restore_and_pass(workload, img, passes=2)


def test_shared_signal_handlers_are_refused(tree_cr, tmp_path):
    """Processes sharing signal handlers and an address space but not their descriptor table:
    the dump refuses (14) naming them, and the tree runs on untouched."""
    workload = tree_cr.start("tree_clone", "sighand")
    message = tree_cr.assert_error(tree_cr.dump(workload, tmp_path / "img"), 14)
    assert re.search(rf"\b{workload.pid}\b", message) and "share" in message, message
    assert not (tmp_path / "img").exists()
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.mark.parametrize(("how", "says"), [("uts", "uts namespace"), ("chroot", "chroot")])
def test_child_in_a_namespace_of_its_own_is_refused(tree_cr, tmp_path, how, says):
    """A child in a UTS namespace or a root directory of its own (unshare, chroot: a
    container): the dump refuses (14) naming it and what it has, and the tree runs on
    untouched."""
    (tmp_path / "inside").touch()
    workload = tree_cr.start("tree_unshare", how, tmp_path)
    child = tree_cr.trees[workload.pid][1]
    message = tree_cr.assert_error(tree_cr.dump(workload, tmp_path / "img"), 14)
    assert f"process {child} " in message and says in message, message
    assert not (tmp_path / "img").exists()
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_session_whose_leader_exited(tree_cr, tmp_path, mode):
    """An orphan (re-parented to a child subreaper, the root) in the session and group of a
    leader that exited: both come back, and the root is still a subreaper."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_orphan"]])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_orphan_in_a_group_whose_leader_exited(tree_cr, tmp_path, mode):
    """An orphan (re-parented to the root, a child subreaper) in the root's session and in a
    group whose leader exited: the group is made again (its helper, an orphan too, is the
    subreaper's to reap) and the orphan is in it."""
    workload = start(tree_cr, mode, [tree_cr.binaries["tree_orphan"], "group"])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
