"""A Python interpreter in the middle of a loop: after restore it counts on from where it was
(never from 0 again) and ends with the right hash.  And a multiprocessing.Pool job.

Workloads: workloads/counter.py EXPECTED_HASH, workloads/pool.py.
"""

import hashlib
import sys

from harness import WORKLOADS

STEPS, EVERY = 3000, 100  # as in workloads/counter.py


def expected_hash() -> str:
    digest = b""
    for i in range(STEPS):
        digest = hashlib.sha256(digest + i.to_bytes(8, "little")).digest()
    return digest.hex()


def test_python_without_checkpoint(cr):
    workload = cr.start("counter.py", expected_hash())
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    assert workload.values("COUNT") == [str(i) for i in range(0, STEPS, EVERY)]


def test_python_counter(cr, tmp_path):
    expected = expected_hash()
    workload = cr.start("counter.py", expected)
    cr.dump_and_kill(workload, tmp_path / "img")
    at_dump = [int(count) for count in workload.values("COUNT")]
    assert at_dump[-1] < STEPS - EVERY, "the dump came too late to show anything"
    cr.restore_and_pass(workload, tmp_path / "img")
    # Each count exactly once: the restored interpreter went on from at_dump[-1].
    assert workload.values("COUNT") == [str(i) for i in range(0, STEPS, EVERY)]
    assert workload.values("HASH") == [expected]


def test_multiprocessing_pool_without_checkpoint(cr):
    workload = cr.start("pool.py")
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_multiprocessing_pool(tree_cr, tmp_path):
    """The pool's parent, its three workers, their pipes and semaphores come back as one job:
    every remaining result arrives, right and in order, from the same worker processes."""
    workload = tree_cr.start("pool.py")
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


def test_multiprocessing_pool_as_a_job(tree_cr, tmp_path):
    workload = tree_cr.start_job([sys.executable, WORKLOADS / "pool.py"])
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
