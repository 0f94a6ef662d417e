"""Blocking system calls: a process checkpointed inside one carries on after restore as if
nothing happened (no EINTR, the normal result, the full wait).

Workload: workloads/blocking.c MODE.  The terminal modes read from stdin, a pty: the original
gets one, the restore another (hpccr reconnects the terminal to the one of `hpccr restore`), and
the test types a line into the new one that the restored process must read.
"""

import os

import pytest

LINE = b"hpccr says hello\n"
SLEEPS = ["nanosleep", "clock_nanosleep", "futex"]
TERMINAL_CALLS = ["poll", "read"]


@pytest.fixture
def pty():
    """A factory of (master, slave) pseudo-terminal pairs, all closed at the end."""
    opened = []

    def new() -> tuple[int, int]:
        pair = os.openpty()
        opened.extend(pair)
        return pair

    yield new
    for fd in opened:
        os.close(fd)


@pytest.mark.parametrize("mode", SLEEPS)
def test_sleep_without_checkpoint(cr, mode):
    workload = cr.start("blocking", mode)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.mark.parametrize("mode", SLEEPS)
def test_sleep(cr, tmp_path, mode):
    workload = cr.start("blocking", mode)
    cr.checkpoint_restart(workload, tmp_path / "img")


@pytest.mark.parametrize("mode", TERMINAL_CALLS)
def test_terminal_without_checkpoint(cr, pty, mode):
    master, slave = pty()
    workload = cr.start("blocking", mode, stdin=slave)
    os.write(master, LINE)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.mark.parametrize("mode", TERMINAL_CALLS)
def test_terminal(cr, tmp_path, pty, mode):
    _, old_slave = pty()
    workload = cr.start("blocking", mode, stdin=old_slave)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)

    master, slave = pty()
    restore = cr.restore_in_background(img, stdin=slave)
    terminal = os.ttyname(slave)

    def on_new_terminal() -> bool:
        if restore.poll() is not None:
            pytest.fail(f"hpccr restore ended early: {restore.communicate()}")
        try:
            status = workload.status()
            return status["TracerPid"] == "0" and os.readlink(f"/proc/{workload.pid}/fd/0") == (
                terminal
            )
        except FileNotFoundError:
            return False

    cr.wait_until(on_new_terminal, f"the restored process to read from {terminal}")
    os.write(master, LINE)
    out, err = restore.communicate(timeout=60)
    assert restore.returncode == 0, (out, err, workload.output())
    workload.assert_passed()
