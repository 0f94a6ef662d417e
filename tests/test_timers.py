"""Interval timers: ITIMER_REAL and ITIMER_VIRTUAL stay armed with their intervals and keep
firing after restore.

Workload: workloads/itimers.c (counts SIGALRM and SIGVTALRM and checks getitimer).
"""


def test_itimers_without_checkpoint(cr):
    workload = cr.start("itimers")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_itimers(cr, tmp_path):
    workload = cr.start("itimers")
    cr.checkpoint_restart(workload, tmp_path / "img")


def test_fired_real_timer(cr, tmp_path):
    """Dumped between firing and its SIGALRM being taken, the real timer still re-arms."""
    workload = cr.start("itimers", "fired")
    cr.checkpoint_restart(workload, tmp_path / "img")
