"""Signals: handlers, masks, the alternate stack and pending signals (process-wide and
thread-directed, with their siginfo) survive a checkpoint.

Workload: workloads/signals.c (checks everything itself after the window, then unblocks and
checks what its handler was given).
"""


def test_signals_without_checkpoint(cr):
    workload = cr.start("signals")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_signals(cr, tmp_path):
    workload = cr.start("signals")
    cr.checkpoint_restart(workload, tmp_path / "img")


def test_signals_leave_running(cr, tmp_path):
    """The dump must neither consume nor add pending signals of the process it leaves running."""
    workload = cr.start("signals", append=True)
    cr.leave_running_then_restore(workload, tmp_path / "img")
