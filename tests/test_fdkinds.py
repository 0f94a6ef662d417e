"""Descriptor kinds beyond files and terminals: eventfd, timerfd, signalfd, epoll, inotify, pipes
and FIFOs held by one process come back with their state, and so does signal-driven I/O
(O_ASYNC, owner and signal), a pseudo-terminal (both ends, settings, output not read yet) and
POSIX message queues (attributes and messages, also an unlinked one), and epoll watches whose
number was closed or holds another file since; pipes shared with another process are refused,
and the process runs on untouched.

Workloads: workloads/fd_eventfd.c, fd_timerfd.c, fd_signalfd.c, fd_epoll.c [stale],
fd_inotify.c DIR, fd_pipe.c [peer], fd_fifo.c DIR, fd_async.c, fd_pty.c, fd_mqueue.c NAME
(POSIX message queues).  Each checks its own state after the window.
"""

import os
import re
import subprocess
import time

import pytest

KINDS = ["fd_eventfd", "fd_timerfd", "fd_signalfd", "fd_epoll", "fd_inotify", "fd_pipe", "fd_fifo",
         "fd_async", "fd_pty", "fd_mqueue"]
# Between the kill and the restore: long enough for the timerfd workload to notice a
# CLOCK_REALTIME absolute timer restored as a relative one (it allows 0.5 s).
DOWNTIME_S = 1.0


def start(cr, tmp_path, name, **kwargs):
    queue = f"hpccr-test-{os.getpid()}-{tmp_path.name}"  # queues outlive a killed test
    args = {"fd_fifo": [tmp_path], "fd_inotify": [tmp_path], "fd_mqueue": [queue]}.get(name, [])
    return cr.start(name, *args, **kwargs)


@pytest.mark.parametrize("name", KINDS)
def test_without_checkpoint(cr, tmp_path, name):
    workload = start(cr, tmp_path, name)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.mark.parametrize("name", KINDS)
def test_checkpoint_restart(cr, tmp_path, name):
    workload = start(cr, tmp_path, name)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    time.sleep(DOWNTIME_S)
    cr.restore_and_pass(workload, img)


def test_inotify_image_names_the_watched_files(cr, tmp_path):
    """hpccr show lists each watch with the file's present name (the renamed "b2", found by
    its handle), its number and its mask."""
    workload = start(cr, tmp_path, "fd_inotify")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    shown = cr.run("show", img)
    assert shown.returncode == 0, shown.stderr
    for watch in (f"{tmp_path}/w (wd 1, mask 0x300)", f"{tmp_path}/a (wd 3, mask 0x2)",
                  f"{tmp_path}/b2 (wd 4, mask 0x80000004)", f"{tmp_path}/a (wd 1, mask 0x8)"):
        assert watch in shown.stdout, (watch, shown.stdout)
    cr.restore_and_pass(workload, img)


@pytest.mark.parametrize("name", KINDS)
def test_leave_running(cr, tmp_path, name):
    """The original runs on and passes (nothing was consumed: pipe data, eventfd counters,
    pending signals and expirations); then the image restores and passes too."""
    workload = start(cr, tmp_path, name, append=True)
    cr.leave_running_then_restore(workload, tmp_path / "img")


def test_pipe_image_holds_the_data(cr, tmp_path):
    """The unread 100 KiB is in the image once, as a file of its own; the capacity is saved."""
    workload = cr.start("fd_pipe")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    sizes = sorted(p.stat().st_size for p in img.glob("pipe-*.img"))
    assert sizes == [4, 100 * 1024], sizes
    cr.restore_and_pass(workload, img)


def assert_refused(cr, tmp_path, workload, fd: str, *words: str) -> None:
    """The dump refuses (14) naming the descriptor; the process runs on and passes."""
    message = cr.assert_error(cr.dump(workload, tmp_path / "img"), 14)
    assert re.search(rf"\bfd {fd}\b", message), message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "img").exists()
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_pipe_to_a_child_is_kept(tree_cr, tmp_path):
    """The child holding the other end is part of the dumped tree: the pipe and its data come
    back connected to it.  (A tree: the restore waits until the killed child's pid is free.)"""
    workload = tree_cr.start("fd_pipe", "peer")
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_stdin_pipe_from_the_parent_is_refused(cr, tmp_path):
    """A job's stdin, stdout or stderr piped to its parent is a pipe to another process too:
    refused for now, naming the stream."""
    workload = start(cr, tmp_path, "fd_eventfd", stdin=subprocess.PIPE)
    assert_refused(cr, tmp_path, workload, "0", "(stdin)", "another process")
    workload.proc.stdin.close()


@pytest.mark.parametrize("mode", ["kill", "leave-running"])
def test_epoll_watches_on_closed_and_replaced_numbers(cr, tmp_path, mode):
    """The watches of a file registered under a number closed since, or holding another file
    now, come back (fd_epoll stale checks them): the dump finds the file through the process's
    other descriptor of it (kcmp)."""
    workload = cr.start("fd_epoll", "stale", append=mode != "kill")
    if mode == "kill":
        cr.checkpoint_restart(workload, tmp_path / "img")
    else:
        cr.leave_running_then_restore(workload, tmp_path / "img")


def test_message_queues_of_a_job(tree_cr, tmp_path):
    """In a job (hpccr run: its own IPC namespace, which ends with it) the queues are made
    again from the image, with their attributes and messages."""
    job = tree_cr.start_job([tree_cr.binaries["fd_mqueue"], "queue"])
    tree_cr.dump_and_kill(job, tmp_path / "img")
    assert len(list((tmp_path / "img").glob("mqueue-*.img"))) == 2
    tree_cr.restore_and_pass(job, tmp_path / "img")
