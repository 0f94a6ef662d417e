"""Memory: every kind of mapping comes back with its content and protection.

Workload: workloads/memory.c (64 MiB of PRNG data, anonymous, private and shared file mappings,
a PROT_NONE region, the brk heap; it checks everything itself and prints its checksums).
"""

import ctypes
import mmap
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import pytest

from hpccr import native
from hpccr.engine.placement import UFFD_USER_MODE_ONLY, UFFDIO_REGISTER_MODE_MISSING
from hpccr.engine.snapshot import UFFD_API, UFFDIO_API, UFFDIO_REGISTER, uffd_ioctl

PAGE = native.PAGE_SIZE

# mem_pieces' window for a --leave-running dump, which returns once the pages are copied
# while the workload runs on: it must still be there at the end of that copy.
LEAVE_RUNNING_WINDOW_S = 15


def test_memory_without_checkpoint(cr, tmp_path):
    workload = cr.start("memory", tmp_path)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_memory_workload_detects_a_changed_word(cr, tmp_path):
    """Control: one word changed behind the workload's back (through /proc/PID/mem) fails it."""
    workload = cr.start("memory", tmp_path)
    word = int(workload.values("ADDR")[0], 16) + 8 * 12345
    with open(f"/proc/{workload.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(word)
        value = mem.read(8)
        mem.seek(word)
        mem.write(bytes(b ^ 0xFF for b in value))
    assert workload.wait_exit() == 1
    assert workload.lines()[-1] == "FAIL malloc'd buffer differs at offset 98760"


def test_memory(cr, tmp_path):
    workload = cr.start("memory", tmp_path)
    cr.checkpoint_restart(workload, tmp_path / "img")
    before, after = workload.values("CSUM")
    assert before == after


def test_memory_leave_running(cr, tmp_path):
    """The original keeps running untouched after the dump; killed, it is restored from the
    image.  (It is killed inside its window: afterwards it writes to its shared file mapping,
    which would change the file the image maps.)"""
    workload = cr.start("memory", tmp_path, append=True)
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, res.stderr
    assert workload.proc.poll() is None, "the original stopped: " + workload.output()
    workload.assert_untouched()
    workload.proc.kill()
    workload.proc.wait(timeout=10)
    assert "PASS" not in workload.lines()
    cr.restore_and_pass(workload, img)


def test_memory_in_pieces(cr, tmp_path):
    """512 MiB cut into about 1200 VMAs by single PROT_NONE and PROT_READ pages (guard pages,
    JIT heaps): every byte and every page's protection comes back (workloads/mem_pieces.c)."""
    workload = cr.start("mem_pieces")
    cr.checkpoint_restart(workload, tmp_path / "img")


def test_memory_in_pieces_leave_running(cr, tmp_path):
    """The same with the copy-on-write snapshot of a running dump: the original passes, then
    the image restores and passes too.  Its window is longer than the dump: the original must
    not end before its 512 MiB are copied (a loaded machine copies them in seconds)."""
    workload = cr.start("mem_pieces", LEAVE_RUNNING_WINDOW_S, append=True)
    cr.leave_running_then_restore(workload, tmp_path / "img")


def test_advice_locks_and_policies(cr, tmp_path):
    """The madvise state (DONTFORK, WIPEONFORK, DONTDUMP, HUGEPAGE, NOHUGEPAGE), mlock (also on
    fault) and NUMA policies (bind, interleave) of mappings come back, and a shared file
    mapping from a descriptor opened for writing can still become writable.  hpccr show lists
    them with each mapping."""
    workload = cr.start("mem_advice", tmp_path)
    cr.dump_and_kill(workload, tmp_path / "img")
    shown = cr.run("show", tmp_path / "img")
    assert shown.returncode == 0, shown.stderr
    for note in ("MADV_DONTFORK", "MADV_WIPEONFORK", "MADV_DONTDUMP", "MADV_HUGEPAGE",
                 "MADV_NOHUGEPAGE", "[mlock]", "mlock (MLOCK_ONFAULT)", "NUMA policy bind:0",
                 "NUMA policy interleave:0", "shared.dat [may become writable]"):
        assert note in shown.stdout, (note, shown.stdout)
    cr.restore_and_pass(workload, tmp_path / "img")


@pytest.mark.parametrize("mode", ["kill", "leave-running"])
def test_descriptor_of_shared_anonymous_memory(cr, tmp_path, mode):
    """A descriptor opened on shared anonymous memory (its map_files link) is the mapping's own
    object again after restore, on a memory file system as before
    (workloads/mem_shared_anon_fd.c checks both ways and fstatfs)."""
    workload = cr.start("mem_shared_anon_fd", append=mode != "kill")
    if mode == "kill":
        cr.checkpoint_restart(workload, tmp_path / "img")
    else:
        cr.leave_running_then_restore(workload, tmp_path / "img")


def test_memory_compressed(cr, tmp_path):
    """--compress (and the site's compress setting, HPCCR_COMPRESS): the pages are one zstd
    stream, pages-<pid>.img.zst, decompressed batch by batch at restore; every mapping comes
    back as without compression."""
    workload = cr.start("memory", tmp_path)
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--compress")
    assert res.returncode == 0, res.stderr
    assert workload.proc.wait(timeout=10) < 0, "the dumped process was not killed"
    assert (img / f"pages-{workload.pid}.img.zst").exists()
    assert not (img / f"pages-{workload.pid}.img").exists()
    cr.restore_and_pass(workload, img)
    before, after = workload.values("CSUM")
    assert before == after


@pytest.mark.parametrize("direct_io", ["yes", "no"])
def test_pages_written_past_the_page_cache(cr, monkeypatch, direct_io):
    """A dump writes the pages with O_DIRECT: none of them is left in the node's page cache
    (a read that must not wait for the disk is refused); the site's direct_io setting
    (HPCCR_DIRECT_IO) no: written through it.  Either way the image restores."""
    monkeypatch.setenv("HPCCR_DIRECT_IO", direct_io)
    scratch = Path(tempfile.mkdtemp(prefix="hpccr-direct-", dir="/var/tmp"))  # a disk's
    try:
        workload = cr.start("memory", scratch)
        img = scratch / "img"
        cr.dump_and_kill(workload, img)
        fd = os.open(img / f"pages-{workload.pid}.img", os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
            cached = True
        except BlockingIOError:
            cached = False
        finally:
            os.close(fd)
        assert cached == (direct_io == "no")
        cr.restore_and_pass(workload, img)
    finally:
        shutil.rmtree(scratch)


def test_memory_in_pieces_compressed_by_the_site_setting(cr, tmp_path, monkeypatch):
    """The copy-on-write snapshot's pages compressed too (a running dump), thousands of runs."""
    monkeypatch.setenv("HPCCR_COMPRESS", "yes")
    workload = cr.start("mem_pieces", LEAVE_RUNNING_WINDOW_S, append=True)
    img = tmp_path / "img"
    res = cr.dump(workload, img, "--leave-running")
    assert res.returncode == 0, res.stderr
    assert (img / f"pages-{workload.pid}.img.zst").exists()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    monkeypatch.setenv("HPCCR_COMPRESS", "no")
    cr.restore_and_pass(workload, img, passes=2)


def present_pages(pid: int, start: int, size: int) -> int:
    """How many pages of [start, start + size) are resident in process `pid` (pagemap)."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // 4096 * 8)
        entries = pagemap.read(size // 4096 * 8)
    return sum(entry >> 63 for entry in struct.unpack(f"<{len(entries) // 8}Q", entries))


def test_pages_never_written_stay_unpopulated(cr, tmp_path):
    """A mapping of which only every other MiB was written comes back with those pages only:
    the others are not made resident by the restore (they read as zeros, as before).
    (workloads/sparse_writes.py checks every block itself.)"""
    workload = cr.start("sparse_writes.py")
    start = int(workload.values("ADDR")[0], 16)
    before = present_pages(workload.pid, start, 64 << 20)
    assert before == 32 << 20 >> 12
    cr.dump_and_kill(workload, tmp_path / "img")
    res = cr.restore(tmp_path / "img", "--detach")
    assert res.returncode == 0, res.stderr
    assert present_pages(workload.pid, start, 64 << 20) == before
    os.kill(workload.pid, signal.SIGUSR1)
    workload.wait_for("PASS")


def test_pages_placed_by_userfaultfd():
    """native.place_ranges, which a restore writes pages with: UFFDIO_COPY into memory
    registered with a userfaultfd (UFFD_USER_MODE_ONLY, as a restore's: process_vm_writev
    cannot fill such a page, it fails with EFAULT), process_vm_writev for a page already there
    and for a range outside; every byte lands where it should."""
    size, outside_size = 64 * PAGE, 4 * PAGE
    registered = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    outside = mmap.mmap(-1, outside_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(registered))
    registered[5 * PAGE] = 1  # present before it is registered: UFFDIO_COPY says EEXIST
    uffd = native.syscall("userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    try:
        uffd_ioctl(uffd, UFFDIO_API, UFFD_API, 0, 0)
        uffd_ioctl(uffd, UFFDIO_REGISTER, start, size, UFFDIO_REGISTER_MODE_MISSING, 0)
        data = os.urandom(size + outside_size)
        addrs = native.ffi.new("unsigned long long[]",
                               [start, ctypes.addressof(ctypes.c_char.from_buffer(outside))])
        lens = native.ffi.new("unsigned long long[]", [size, outside_size])
        assert native.place_ranges(uffd, os.getpid(), addrs, lens, 2, data) == len(data)
    finally:
        os.close(uffd)  # unregisters: a page it missed reads as zeros, it does not wait
    assert registered[:] == data[:size]
    assert outside[:] == data[size:]
