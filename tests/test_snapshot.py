"""Copy-on-write snapshot of a running dump (hpccr/engine/snapshot.py).

A --leave-running dump freezes the process only while it reads its state and write-protects its
memory; the pages are copied while it runs on. These tests make the process write its memory as
fast as it can meanwhile, and let it check the restored memory against its own registers.

Workload (compiled here): a writer thread sweeps an array, one word every 512 bytes; in sweep g it
checks that every word holds g-1 before storing g. A torn image (pages from different moments, or
not matching the writer's own g and position) fails within one sweep after the restore. A second
thread releases a 16 MiB "victim" region (munmap or MADV_DONTNEED) once the file DIR/release
exists, and records that it did in memory. Once DIR/stop exists the writer does one more whole
sweep, checks the victim against that record, prints PASS and exits.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from harness import TIMEOUT, cli_argv, cli_env, describe, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dumps need root")

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define STRIDE 64 /* words: one every 512 bytes */
#define VICTIM (16u << 20)
#define SAY(...) (printf(__VA_ARGS__), fflush(stdout))
#define FAIL(...) (SAY("FAIL " __VA_ARGS__), exit(1))

static const char *dir, *how;
static volatile uint64_t *a, *victim;
static size_t words;
static volatile int released;

static int exists(const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

static uint64_t pattern(size_t i) { return i * 0x9e3779b97f4a7c15ull ^ 0x5eed; }

static void check_victim(void)
{
    if (!released) {
        for (size_t i = 0; i < VICTIM / 8; i++)
            if (victim[i] != pattern(i))
                FAIL("victim word %zu is %lx\n", i, (unsigned long)victim[i]);
    } else if (!strcmp(how, "madvise")) {
        for (size_t i = 0; i < VICTIM / 8; i++)
            if (victim[i])
                FAIL("released victim word %zu is %lx\n", i, (unsigned long)victim[i]);
    } else if (msync((void *)victim, VICTIM, MS_ASYNC) == 0 || errno != ENOMEM) {
        FAIL("the unmapped victim is mapped\n");
    }
}

static void *releaser(void *arg)
{
    struct timespec ms = {0, 1000000};

    (void)arg;
    while (!released && strcmp(how, "none")) {
        if (exists("release")) {
            released = 1;
            if (!strcmp(how, "munmap"))
                munmap((void *)victim, VICTIM);
            else
                madvise((void *)victim, VICTIM, MADV_DONTNEED);
        }
        nanosleep(&ms, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t thread;
    int stopping = 0;

    if (argc != 4)
        return 2;
    dir = argv[1];
    words = (strtoull(argv[2], NULL, 0) << 20) / 8;
    how = argv[3];
    /* The victim first, so that it lies above the array: a dump copies it last. */
    victim = mmap(NULL, VICTIM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    a = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (victim == MAP_FAILED || a == MAP_FAILED)
        return 2;
    for (size_t i = 0; i < VICTIM / 8; i++)
        victim[i] = pattern(i);
    SAY("PID %d\n", getpid());
    pthread_create(&thread, NULL, releaser, NULL);
    for (uint64_t g = 1;; g++) {
        if (stopping) {
            check_victim();
            SAY("PASS\n");
            return 0;
        }
        stopping = exists("stop");
        for (size_t i = 0; i < words; i += STRIDE) {
            if (a[i] != g - 1)
                FAIL("word %zu is %lu in sweep %lu\n", i, (unsigned long)a[i], (unsigned long)g);
            a[i] = g;
        }
        if (g == 2)
            SAY("READY\n");
    }
}
"""


@pytest.fixture(scope="module")
def writer_binary(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snapshot") / "cow_writer"
    res = subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-x", "c", "-o", str(out), "-"],
                         input=SOURCE, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0 and not res.stderr, res.stderr
    return out


@pytest.fixture
def control():
    """The directory of the workload's release and stop files; uid 1000 can use it too (the
    test's own tmp_path is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="hpccr-snapshot-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def field(pid: int, name: str, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def all_traced(pid: int) -> bool:
    """Whether every thread of `pid` is seized by a tracer (the dump froze them all)."""
    try:
        return all(field(pid, "TracerPid", int(tid)) != "0"
                   for tid in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:  # a thread's status, as the dump ended
        return False


def registered(pid: int) -> bool:
    """Whether some VMA of `pid` is registered with a userfaultfd (uw/um/ui in VmFlags)."""
    return any(line.startswith("VmFlags:") and {"uw", "um", "ui"} & set(line.split())
               for line in Path(f"/proc/{pid}/smaps").read_text().splitlines())


def assert_no_snapshot_left(pid: int) -> None:
    assert not registered(pid)
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [link for link in links if "userfaultfd" in link], links


def start_dump(pid: int, img: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_argv("dump", pid, "-D", img, "--leave-running"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def restore_after_stop(cr, workload, img: Path, control: Path) -> None:
    """Kill the original, then restore the image: the restored writer must check a whole sweep
    and the victim, then pass."""
    workload.proc.kill()
    workload.proc.wait(timeout=10)
    assert "FAIL" not in workload.output()
    (control / "stop").touch()
    cr.restore_and_pass(workload, img)


def test_writer_without_checkpoint(cr, writer_binary, control):
    workload = cr.start(writer_binary, control, 64, "munmap")
    (control / "release").touch()
    (control / "stop").touch()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_snapshot_of_a_busy_writer(cr, writer_binary, control, tmp_path):
    """The process writes all the time while its pages are copied, yet the image is one
    moment of it; afterwards it runs on with no trace of the snapshot."""
    workload = cr.start(writer_binary, control, 256, "none")
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, describe(res)
    assert "warning" not in res.stderr, res.stderr  # the snapshot held: no second freeze
    workload.assert_untouched()
    assert_no_snapshot_left(workload.pid)
    time.sleep(0.3)  # the original checks a few more sweeps of its own memory
    assert workload.proc.poll() is None, workload.output()
    restore_after_stop(cr, workload, img, control)


@pytest.mark.parametrize("how", ["munmap", "madvise"])
def test_memory_released_during_the_copy(cr, writer_binary, control, tmp_path, how):
    """The process releases memory not copied yet while the dump copies: the snapshot is lost,
    and the dump starts over frozen; the image is still one moment of the process."""
    workload = cr.start(writer_binary, control, 256, how)
    img = tmp_path / "img"
    for _ in range(5):  # the release must come after the freeze and before the copy ends
        shutil.rmtree(img, ignore_errors=True)
        dumper = start_dump(workload.pid, img)
        while dumper.poll() is None and not all_traced(workload.pid):
            time.sleep(0.0005)
        frozen = dumper.poll() is None
        if frozen:
            (control / "release").touch()  # seen by the process as soon as it runs again
        out, err = dumper.communicate(timeout=TIMEOUT)
        assert dumper.returncode == 0, err
        if frozen:
            break
    else:
        pytest.fail("never saw the dump freeze the process")
    assert "memory snapshot" in err and "lost" in err, err
    workload.assert_untouched()
    assert_no_snapshot_left(workload.pid)
    restore_after_stop(cr, workload, img, control)


def test_dumper_killed_during_the_copy(cr, writer_binary, control, tmp_path):
    """A dumper that dies while it copies takes its userfaultfd with it: the kernel drops the
    write protection and wakes the writer it held, which then runs on unharmed."""
    workload = cr.start(writer_binary, control, 512, "none")
    pid = workload.pid  # the writer is the main thread
    for _ in range(5):
        dumper = start_dump(pid, tmp_path / "img")
        # Copying: the process is thawed (no tracer) and its memory still registered.
        while dumper.poll() is None and not (field(pid, "TracerPid") == "0" and registered(pid)):
            time.sleep(0.001)
        if dumper.poll() is None:
            dumper.send_signal(signal.SIGSTOP)
            break
        dumper.communicate()
        shutil.rmtree(tmp_path / "img", ignore_errors=True)
    else:
        pytest.fail("never caught the dump while it copied")
    try:
        # With the copy stopped, the writer soon waits for a page not copied yet.
        wait_until(lambda: "userfault" in Path(f"/proc/{pid}/wchan")
                   .read_text(), "the writer to wait on a write-protected page")
    finally:
        dumper.kill()
        dumper.communicate(timeout=TIMEOUT)
    assert not (tmp_path / "img").exists()

    def writer_runs() -> bool:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "R"

    wait_until(writer_runs, "the writer to run again")
    workload.assert_untouched()
    assert_no_snapshot_left(pid)
    (control / "stop").touch()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs: an image of the 256 MiB writer runs out of space while it is copied."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                      check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_the_copy(cr, writer_binary, control, small_fs):
    """The image cannot be written while the process runs on: the dump fails, and the process
    is left running with no trace of the snapshot."""
    workload = cr.start(writer_binary, control, 256, "none")
    res = cr.dump(workload, small_fs / "img", "--leave-running")
    assert "No space left" in cr.assert_error(res, 20)
    workload.assert_untouched()
    assert_no_snapshot_left(workload.pid)
    assert not (small_fs / "img").exists()
    (control / "stop").touch()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_unprivileged_writer(cr, writer_binary, control, tmp_path):
    """A process without CAP_SYS_PTRACE cannot have a userfaultfd that waits on kernel writes
    (vm.unprivileged_userfaultfd=0): its running dump copies inside the freeze instead."""
    program = control / "cow_writer"
    shutil.copy(writer_binary, program)
    program.chmod(0o755)
    workload = cr.start(program, control, 64, "none", cwd=control, user=1000, group=1000,
                        extra_groups=[])
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, describe(res)
    workload.assert_untouched()
    assert_no_snapshot_left(workload.pid)
    restore_after_stop(cr, workload, img, control)
