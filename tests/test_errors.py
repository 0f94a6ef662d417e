"""Bad inputs and refused dumps: one clear `hpccr: error:` line with the documented exit code,
never a traceback; the image and the process are left as they were.

Workloads: workloads/idle.c [SECONDS], workloads/holdfd.c KIND [SECONDS],
workloads/tree_procfiles.c (files under /proc of its own processes).
"""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import xxhash
from harness import cli_argv, cli_env, describe

# A step, then the resource that ran out (a buffer or thread of hpccr's), or hpccr's own memory.
RAN_OUT = (r"[^:]+: (.+: (Cannot allocate memory|Resource temporarily unavailable)"
           r"|hpccr's own memory ran out .*)")
# Candidate xstate components to claim in a doctored image: APX, then bits no CPU defines yet.
XFEATURE_CANDIDATES = [19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]


def free_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(pid for pid in range(pid_max - 1, 1, -1) if not Path(f"/proc/{pid}").exists())


def only_file(img: Path, pattern: str) -> Path:
    (path,) = img.glob(pattern)
    return path


def rewrite_image_json(img: Path, change) -> None:
    """Apply ``change`` to image.json and fix its line in ``checksums`` (docs/image-format.md),
    so that the image stays consistent and only the change matters."""
    meta = json.loads((img / "image.json").read_text())
    change(meta)
    data = json.dumps(meta, indent=2).encode()
    (img / "image.json").write_bytes(data)
    lines = []
    for line in (img / "checksums").read_text().splitlines():
        if line.split()[-1] == "image.json":
            line = f"xxh3-128 {xxhash.xxh3_128_hexdigest(data)}  {len(data)}  image.json"
        lines.append(line)
    (img / "checksums").write_text("\n".join(lines) + "\n")


def snapshot(img: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(img.iterdir())}


def test_dump_of_missing_pid(cr, tmp_path):
    cr.assert_error(cr.run("dump", free_pid(), "-D", tmp_path / "img"), 10)
    assert not (tmp_path / "img").exists()


def test_restore_of_missing_image(cr, tmp_path):
    cr.assert_error(cr.restore(tmp_path / "nothing-here"), 12)


def test_corrupt_and_truncated_pages(cr, tmp_path):
    """A flipped byte or a truncated pages file: 13, the image untouched; repaired, it works."""
    workload = cr.start("idle")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    pages = only_file(img, "pages-*.img")
    good = pages.read_bytes()
    assert good, "no pages saved"

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    pages.write_bytes(flipped)
    corrupt = snapshot(img)
    cr.assert_error(cr.restore(img), 13)
    assert snapshot(img) == corrupt
    assert not workload.alive()

    pages.write_bytes(good[: len(good) - 4096])
    truncated = snapshot(img)
    cr.assert_error(cr.restore(img), 13)
    assert snapshot(img) == truncated
    assert not workload.alive()

    pages.write_bytes(good)
    cr.restore_and_pass(workload, img)


def test_restore_while_the_original_runs(cr, tmp_path):
    """The pid is taken by the running original: 15, and the original is left alone."""
    workload = cr.start("idle", 6, append=True)
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, res.stderr
    message = cr.assert_error(cr.restore(img), 15)
    assert str(workload.pid) in message
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    cr.restore_and_pass(workload, img, passes=2)


def test_image_needs_cpu_features_missing_here(cr, tmp_path):
    """An image claiming an xstate component this CPU lacks: 16; the real value restores."""
    workload = cr.start("idle")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    xfeatures = json.loads((img / "image.json").read_text())["cpu"]["xfeatures"]
    missing = next(bit for bit in XFEATURE_CANDIDATES if not xfeatures >> bit & 1)

    def claim(meta):
        meta["cpu"]["xfeatures"] = xfeatures | 1 << missing

    def restore_real(meta):
        meta["cpu"]["xfeatures"] = xfeatures

    rewrite_image_json(img, claim)
    cr.assert_error(cr.restore(img), 16)
    assert not workload.alive()
    rewrite_image_json(img, restore_real)
    cr.restore_and_pass(workload, img)


@pytest.mark.parametrize("kind", ["socket", "userfaultfd"])
def test_unsupported_descriptor(cr, tmp_path, kind):
    """The dump refuses (14) naming the descriptor and its kind; the process runs on untouched
    and its data is still there.  The socket is a TCP listener with a connection waiting to be
    accepted (other network sockets are supported)."""
    workload = cr.start("holdfd", kind, 6)
    fd, _ = workload.values("FD")[0].split()
    message = cr.assert_error(cr.dump(workload, tmp_path / "img"), 14)
    assert re.search(rf"\b{fd}\b", message) and kind in message.lower(), message
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_file_that_lives_on_under_another_name(cr, tmp_path):
    """A file opened by one of its two names (hard links), that name then removed: /proc shows
    it deleted, yet it is not — the other name still reaches it, and writes through the
    descriptor must stay visible there.  A copy would break that and the name cannot be found:
    the dump refuses (14) naming the descriptor, and the process runs on untouched."""
    workload = cr.start("holdfd", "linked", 6)
    fd, _ = workload.values("FD")[0].split()
    message = cr.assert_error(cr.dump(workload, tmp_path / "img"), 14)
    assert f"fd {fd} is " in message and "lives on under another (a hard link)" in message
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_restore_exits_with_the_restored_status(cr, tmp_path):
    """Without --detach, hpccr restore ends as the restored process does: 128+N if killed."""
    workload = cr.start("idle", 30)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    restore = cr.restore_in_background(img)
    cr.wait_until(lambda: workload.alive() and workload.status()["Name"] == "idle"
                  and workload.status()["TracerPid"] == "0", "restore")
    os.kill(workload.pid, signal.SIGTERM)
    restore.communicate(timeout=60)
    assert restore.returncode == 128 + signal.SIGTERM


def test_two_images_of_a_running_process(cr, tmp_path):
    """Two --leave-running dumps into two directories; each restores on its own."""
    workload = cr.start("idle", append=True)
    first, second = tmp_path / "first", tmp_path / "second"
    for img in (first, second):
        res = cr.dump(workload, img, "--leave-running")
        assert res.returncode == 0, res.stderr
    workload.proc.kill()
    workload.wait_exit()
    cr.restore_and_pass(workload, first)
    cr.restore_and_pass(workload, second, passes=2)


def test_dump_into_unwritable_place(cr, tmp_path):
    """The image's parent is a regular file: 20, nothing written, the process runs on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    workload = cr.start("idle", 6)
    cr.assert_error(cr.dump(workload, blocker / "img"), 20)
    assert blocker.read_text() == "not a directory\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["a-file", workload.log.name])
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def first_failure_out_of_address_space(argv, passed) -> subprocess.CompletedProcess:
    """Run `argv(limit)` with an address space of 128 MiB, then 4 MiB less each time, calling
    `passed()` after each run that exits 0, until one fails: that run.  The first must pass,
    or the test would not know where hpccr's memory runs out."""
    for limit in range(128, 16, -4):
        res = subprocess.run(argv(limit), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=60, env=cli_env())
        if res.returncode != 0:
            assert limit < 128, f"the first run failed: the limit is too low\n{describe(res)}"
            return res
        passed()
    pytest.fail("every run passed, down to 20 MiB of address space")


def test_dump_out_of_address_space(cr, tmp_path):
    """An errno hpccr has no error of its own for (ENOMEM, EAGAIN: the dumper may not map its
    copy buffers or start its writer thread) is still exit code 18, with the step and the
    resource named, never a traceback: the address space of `hpccr dump` is lowered 4 MiB at a
    time until a dump fails, wherever its memory runs out first.  The process runs on untouched
    and nothing is left of the image."""
    workload = cr.start("idle", 600)
    img = tmp_path / "img"
    res = first_failure_out_of_address_space(
        lambda limit: ["prlimit", f"--as={limit << 20}",
                       *cli_argv("dump", workload.pid, "-D", img, "--leave-running")],
        lambda: shutil.rmtree(img))
    message = cr.assert_error(res, 18)
    assert re.fullmatch(rf"hpccr: error: dump of process {workload.pid}: {RAN_OUT}",
                        message), message
    assert not img.exists()
    workload.assert_untouched()


def test_restore_out_of_address_space(cr, tmp_path):
    """The restore's side of the test above: the address space of `hpccr restore` (a soft
    limit: the processes it makes inherit it, and raise it again to the image's) is lowered
    4 MiB at a time, each restore that passes run to its end (exit status 0: PASS), until one
    fails: exit code 19 with the step and the resource named, no process left, and the image
    still restores."""
    # Its window ends at a moment of the monotonic clock, long past for every restore but the
    # first (each passes at once), long enough for a dump under load (0.2 s was not).
    workload = cr.start("idle", 5)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    res = first_failure_out_of_address_space(
        lambda limit: ["prlimit", f"--as={limit << 20}:unlimited",
                       *cli_argv("restore", "-D", img)],
        workload.assert_passed)  # each run writes over the last: the image's offset
    message = cr.assert_error(res, 19)
    assert re.fullmatch(rf"hpccr: error: restore: process {workload.pid}: {RAN_OUT}",
                        message), message
    assert not workload.alive()
    cr.restore_and_pass(workload, img)


def test_restore_refused_by_a_system_call(cr, tmp_path):
    """A system call refused in the restored process (an mmap at an address not page-aligned,
    written into the image) is exit code 19, naming the process, the step and the mapping;
    nothing is left running, and the real image still restores."""
    workload = cr.start("idle")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    heap = {}

    def misalign(meta):
        (vma,) = [v for v in meta["processes"][0]["vmas"] if v["kind"] == "heap"]
        heap.update(vma)
        vma["start"] += 0x800

    def realign(meta):
        meta["processes"][0]["vmas"] = [heap if v["kind"] == "heap" else v
                                        for v in meta["processes"][0]["vmas"]]

    rewrite_image_json(img, misalign)
    message = cr.assert_error(cr.restore(img), 19)
    assert message == (f"hpccr: error: restore: process {workload.pid}: rebuilding it: mapping "
                       f"{heap['start'] + 0x800:#x}-{heap['end']:#x} (heap): mmap in "
                       f"{workload.pid}: Invalid argument")
    assert not workload.alive()
    rewrite_image_json(img, realign)
    cr.restore_and_pass(workload, img)


@pytest.mark.parametrize("path", ["/proc/{pid}/cwd/etc/passwd", "/proc/{pid}/../1/environ",
                                  "/proc/{pid}/fd/0", "/proc/{pid}/root"])
def test_proc_file_leading_out_of_proc_is_refused(cr, tmp_path, path):
    """An image whose /proc file (opened as root at restore) would lead out of /proc/PID, through
    a link or `..`: refused as corrupted (13) before anything is created."""
    workload = cr.start("tree_procfiles")
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)

    def lead_out(meta: dict) -> None:
        for entry in meta["processes"][0]["fds"]:
            if entry["kind"] == "procfile":
                entry["path"] = path.format(pid=entry["proc_pid"])

    rewrite_image_json(img, lead_out)
    message = cr.assert_error(cr.restore(img), 13)
    assert "is not a /proc file of process" in message, message
    assert "PASS" not in workload.lines()


TRACER = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), 0, 0):  # PTRACE_SEIZE: it runs on, traced
    sys.exit(1)
print("TRACING", flush=True)
sys.stdin.read()  # until the test closes our stdin; the tracee is let go when we exit
"""


def test_traced_process_is_refused(cr, tmp_path):
    """A process traced by someone else (a debugger; another hpccr's dump): refused with 22
    naming the tracer, no image, the process runs on traced by it alone; once let go it dumps."""
    workload = cr.start("idle", 20)
    tracer = subprocess.Popen(["python3", "-c", TRACER, str(workload.pid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline() == "TRACING\n"
        message = cr.assert_error(cr.dump(workload, tmp_path / "img"), 22)
        assert f"traced by process {tracer.pid} (python3)" in message, message
        assert not (tmp_path / "img").exists()
        assert workload.status()["TracerPid"] == str(tracer.pid)
    finally:
        tracer.stdin.close()
        tracer.wait(timeout=30)
    workload.assert_untouched()
    cr.checkpoint_restart(workload, tmp_path / "img")
