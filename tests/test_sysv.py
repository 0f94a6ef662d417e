"""SysV IPC in a job's own IPC namespace: shared memory segments (one of them removed while
attached), semaphore sets and message queues are saved once per image and made again with the
same keys and ids; the job's processes attach their segments again, the counter they share goes
on from where it was, the semaphores keep their values and the queued messages come out in
order with their types.  A tree dumped by its pid (the machine's IPC namespace) that maps a SysV
segment is refused.

Workload: workloads/sysv_counter.c sysv|posix (the counter in a SysV segment or in POSIX shared
memory, under a SysV semaphore either way).
"""

import base64
import json

SHM_DEST = 0o1000


def image_sysv(img) -> dict:
    return json.loads((img / "image.json").read_text())["sysv"]


def test_sysv_objects(tree_cr, tmp_path):
    workload = tree_cr.start_job([tree_cr.binaries["sysv_counter"], "sysv"])
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    shmid, semid, msqid = map(int, workload.values("IDS")[0].split())
    sysv = image_sysv(tmp_path / "img")
    assert [s["id"] for s in sysv["sem"]] == [semid], sysv["sem"]
    assert sysv["sem"][0]["values"] == [1, 7]
    assert [q["id"] for q in sysv["msg"]] == [msqid], sysv["msg"]
    messages = sysv["msg"][0]["messages"]
    assert [(m["type"], base64.b64decode(m["data"])) for m in messages] == [
        (3, b"message 0\0"),
        (1, b"message 1\0"),
        (2, b"message 2\0"),
    ]
    segments = {s["id"]: s for s in sysv["shm"]}
    assert shmid in segments and len(segments) == 2, segments
    assert [bool(s["mode"] & SHM_DEST) for s in segments.values()].count(True) == 1
    tree_cr.restore_and_pass(workload, tmp_path / "img")


def test_posix_shm_and_sysv_semaphore(tree_cr, tmp_path):
    workload = tree_cr.start_job([tree_cr.binaries["sysv_counter"], "posix"])
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    sysv = image_sysv(tmp_path / "img")
    assert sysv["shm"] == [] and len(sysv["sem"]) == 1, sysv
    tree_cr.restore_and_pass(workload, tmp_path / "img")


def test_sysv_segment_outside_a_job_refused(tree_cr, tmp_path):
    """Dumped by its pid, in the machine's IPC namespace: exit 14 and the tree runs on."""
    workload = tree_cr.start("sysv_counter", "sysv")
    message = tree_cr.assert_error(tree_cr.dump(workload, tmp_path / "img"), 14)
    assert "SysV shared memory" in message and "hpccr run" in message, message
    assert not (tmp_path / "img").exists()
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
