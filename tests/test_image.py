"""Image store: round trip, atomic replacement, corruption detection, crash and disk-full safety."""

from __future__ import annotations

import base64
import copy
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hpccr.errors import AccessDenied, ImageCorrupt, ImageNotFound, ImageWriteError
from hpccr.image import (
    PAGE_SIZE,
    ImageReader,
    ImageWriter,
    PageReader,
    PageWriter,
    chain,
    pagemap_name,
    pages_name,
)
from hpccr.image.pages import forked_name, inherited_name, is_pages, pack_runs
from hpccr.image.show import render
from hpccr.spans import intersect, subtract

PID = 4242
U64_MINUS_1 = (1 << 64) - 1


def _regs(rip: int, orig_rax: int) -> dict:
    names = (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp "
        "ss fs_base gs_base ds es fs gs"
    ).split()
    regs = dict.fromkeys(names, 0)
    regs.update(rip=rip, orig_rax=orig_rax, rsp=0x7FFC0000F000)
    return regs


def _thread(tid: int, rip: int, orig_rax: int, pending=()) -> dict:
    return {
        "tid": tid, "comm": "solver", "regs": _regs(rip, orig_rax), "xstate": f"xstate-{tid}.bin",
        "xcomp_perm": 0, "sigmask": 0, "pending": list(pending),
        "sigaltstack": {"sp": 0, "flags": 2, "size": 0}, "clear_child_tid": 0,
        "robust_list": [0, 24], "rseq": None,
        "sched": {"affinity": [0, 1], "nice": 0, "policy": 0, "priority": 0},
    }


def _siginfo(signo: int) -> str:
    return base64.b64encode(signo.to_bytes(4, "little") + bytes(124)).decode()


def fake_meta(pid: int = PID, nr_pages: int = 0) -> dict:
    """An image.json following docs/image-format.md, for one process with two threads."""
    vmas = [
        {"start": 0x400000, "end": 0x401000, "prot": "r-xp", "shared": False, "kind": "file",
         "path": "/usr/bin/solver", "offset": 0,
         "file": {"size": 4096, "mtime_ns": 1, "ghost": None}, "saved_pages": 0,
         "advice": [], "may_write": False, "policy": None},
        {"start": 0x10000000, "end": 0x10000000 + nr_pages * PAGE_SIZE, "prot": "rw-p",
         "shared": False, "kind": "anon", "path": None, "offset": 0, "file": None,
         "saved_pages": nr_pages, "advice": ["dc"], "may_write": True, "policy": "bind:0"},
    ]
    fds = [
        {"fd": 1, "kind": "tty", "path": "/dev/pts/3", "flags": os.O_RDWR, "pos": 0,
         "cloexec": False, "desc": 0, "ghost": None, "mode": 0o20620, "locks": [],
         "sigio": None},
        {"fd": 3, "kind": "file", "path": "/scratch/run/out.log",
         "flags": os.O_WRONLY | os.O_APPEND, "pos": 123, "cloexec": True, "desc": 1,
         "ghost": None, "mode": 0o100644,
         "locks": [{"kind": "posix", "type": "write", "start": 0, "end": None}],
         "sigio": {"owner_type": 1, "owner": 4711, "signal": 0}},
    ]
    proc = {
        "pid": pid, "ppid": 1, "pgid": pid, "sid": pid, "comm": "solver",
        "exe": "/usr/bin/solver", "cmdline": ["solver", "--steps", "10 000"],
        "creds": {"uid": [1000] * 4, "gid": [100] * 4, "groups": [100],
                  "cap_inh": "0", "cap_prm": "0", "cap_eff": "0", "cap_bnd": "1ffffffffff",
                  "cap_amb": "0", "no_new_privs": 0, "dumpable": 1},
        "cwd": "/scratch/run", "umask": 0o22, "personality": 0,
        "rlimits": {"nofile": [1024, 4096], "stack": [8 << 20, -1]},
        "mm": {**dict.fromkeys(
            "start_code end_code start_data end_data start_brk brk start_stack arg_start "
            "arg_end env_start env_end".split(), 0), "auxv": ""},
        "vmas": vmas, "pages": pages_name(pid), "pagemap": pagemap_name(pid),
        "nr_pages": nr_pages,
        "sigactions": [{"signo": 10, "handler": 0x401000, "flags": 0, "restorer": 0, "mask": 0}],
        "itimers": {"real": [0, 0], "virtual": [0, 0], "prof": [0, 0]},
        "posix_timers": [],
        "shared_pending": [_siginfo(signal.SIGUSR1)],
        "fds": fds,
        "threads": [
            _thread(pid, 0x401234, 230),
            _thread(pid + 1, 0x405678, U64_MINUS_1, [_siginfo(signal.SIGUSR2)]),
        ],
        "child_subreaper": 0, "pdeathsig": 0, "exit_status": None, "stopped": False,
        "main_thread_exited": False,
        "shares_with_parent": [],
    }
    return {
        "format": "hpccr-image", "format_version": 1, "hpccr_version": "0.1.0",
        "created": "2026-11-28T05:30:00+00:00", "hostname": "node1", "kernel": "6.18.44",
        "cpu": {"xfeatures": 0x2E7, "xstate_size": 2696}, "root_pid": pid, "sysv": None,
        "network": None, "pidns": False, "timing": {"frozen_s": 0.25, "dump_s": 0.125},
        "processes": [proc],
    }


def pattern(vaddr: int, nr: int) -> bytes:
    """Page content that differs per page, so misplaced pages are detected."""
    return b"".join(
        ((vaddr + i * PAGE_SIZE) // PAGE_SIZE).to_bytes(8, "little") * (PAGE_SIZE // 8)
        for i in range(nr)
    )


RUNS = [(0x10000000, 100), (0x10000000 + 100 * PAGE_SIZE, 156), (0x20000000, 1000),
        (0x7F0000000000, 1)]


def write_image(path, tag: str = "new", runs=RUNS, pid: int = PID, compress: bool = False):
    """A complete image whose image.json carries ``tag``."""
    nr_pages = sum(nr for _, nr in runs)
    meta = fake_meta(pid, nr_pages) | {"hostname": tag}
    with ImageWriter(path) as writer:
        with PageWriter(writer, pid, compress) as pages:
            for vaddr, nr in runs:
                pages.write_run(vaddr, memoryview(pattern(vaddr, nr)))
        for thread in meta["processes"][0]["threads"]:
            writer.write_bytes(thread["xstate"], bytes(2696))
        writer.write_json("image.json", meta)
        return writer.commit()


def partial_dirs(parent) -> list[str]:
    return [name for name in os.listdir(parent) if ".partial-" in name]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_round_trip(tmp_path, compress):
    image = tmp_path / "ckpt" / "img"
    assert write_image(image, compress=compress) == image
    reader = ImageReader(image)
    reader.verify()
    assert reader.meta()["processes"][0]["pid"] == PID
    assert set(reader.files) == {
        "image.json", pages_name(PID) + (".zst" if compress else ""), pagemap_name(PID),
        f"xstate-{PID}.bin", f"xstate-{PID + 1}.bin",
    }
    if compress:  # the pattern compresses well
        assert (image / (pages_name(PID) + ".zst")).stat().st_size < 1257 * PAGE_SIZE // 4
    with PageReader(reader, PID) as pages:
        # The first two runs are contiguous and merged in the index.
        assert [(v, n) for v, n, _ in pages.runs] == [(0x10000000, 256), (0x20000000, 1000),
                                                       (0x7F0000000000, 1)]
        assert pages.nr_pages == 1257
        chunks = pages.chunks([(at, nr * PAGE_SIZE) for _, nr, at in pages.runs], 1)
        for (vaddr, nr, _), chunk in zip(pages.runs, chunks, strict=True):
            assert bytes(chunk) == pattern(vaddr, nr)
            if isinstance(chunk, memoryview):
                chunk.release()
        chunks.close()
    lines = (image / "checksums").read_text().splitlines()
    assert [line.split("  ")[2] for line in lines] == sorted(reader.files)
    assert all(line.startswith("xxh3-128 ") for line in lines)
    assert json.loads((image / "image.json").read_text()) == reader.meta()


def test_stream_accepts_buffers(tmp_path):
    import array

    import cffi

    ffi = cffi.FFI()
    native = ffi.new("char[]", b"ijkl")
    with ImageWriter(tmp_path / "img") as writer:
        with writer.open_stream("data") as stream:
            stream.write(b"ab")
            stream.write(bytearray(b"cd"))
            stream.write(array.array("I", [0x65666768]))
            stream.write(ffi.buffer(native, 4))
            assert stream.size == 12
        writer.write_json("image.json", fake_meta())
        writer.commit()
    reader = ImageReader(tmp_path / "img")
    reader.verify()
    assert reader.read_bytes("data") == b"abcdhgfeijkl"


def test_direct_stream_bypasses_the_page_cache():
    """A direct stream (the pages) leaves nothing in the page cache; what direct I/O refuses (a
    length not a multiple of the disk's blocks) goes on through the cache, nothing lost."""
    scratch = Path(tempfile.mkdtemp(prefix="hpccr-direct-", dir="/var/tmp"))  # a disk's file system
    data = mmap.mmap(-1, 16 * PAGE_SIZE)  # page aligned, as hpccr's copy buffers
    data.write(os.urandom(len(data)))
    try:
        with ImageWriter(scratch / "img") as writer:
            with writer.open_stream("direct", direct=True) as stream:
                stream.write(data)
            with writer.open_stream("mixed", direct=True) as stream:
                stream.write(data)
                stream.write(b"tail")
                stream.write(data)
            writer.write_json("image.json", fake_meta())
            writer.commit()
        fd = os.open(scratch / "img" / "direct", os.O_RDONLY)
        try:  # a read that must not wait for the disk: refused when the pages are not cached
            with pytest.raises(BlockingIOError):
                os.preadv(fd, [bytearray(PAGE_SIZE)], 0, os.RWF_NOWAIT)
        finally:
            os.close(fd)
        reader = ImageReader(scratch / "img")
        reader.verify()
        assert reader.read_bytes("direct") == bytes(data)
        assert reader.read_bytes("mixed") == bytes(data) + b"tail" + bytes(data)
    finally:
        data.close()
        shutil.rmtree(scratch)


def test_empty_pages(tmp_path):
    write_image(tmp_path / "img", runs=[])
    reader = ImageReader(tmp_path / "img")
    reader.verify()
    with PageReader(reader, PID) as pages:
        assert pages.runs == [] and list(pages.chunks([], 1)) == []


def test_page_writer_rejects_unaligned_and_overlap(tmp_path):
    with ImageWriter(tmp_path / "img") as writer:
        pages = PageWriter(writer, PID)
        with pytest.raises(ValueError):
            pages.write_run(0x1000, bytes(100))
        with pytest.raises(ValueError):
            pages.write_run(0x1001, bytes(PAGE_SIZE))
        pages.write_run(0x2000, bytes(2 * PAGE_SIZE))
        pages.write_run(0x1000, bytes(2 * PAGE_SIZE))
        with pytest.raises(ValueError, match="overlap"):
            pages.close()


def test_commit_refuses_unclosed_stream(tmp_path):
    with ImageWriter(tmp_path / "img") as writer:
        writer.open_stream("data")
        with pytest.raises(ValueError, match="unclosed"):
            writer.commit()
    assert os.listdir(tmp_path) == []


def test_atomic_replace(tmp_path):
    image = tmp_path / "img"
    write_image(image, "old", runs=[(0x1000, 3)])
    write_image(image, "new")
    reader = ImageReader(image)
    reader.verify()
    assert reader.meta()["hostname"] == "new"
    with PageReader(reader, PID) as pages:
        assert pages.nr_pages == 1257
    assert partial_dirs(tmp_path) == []
    assert os.listdir(tmp_path) == ["img"]


def test_replace_empty_directory(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img")
    ImageReader(tmp_path / "img").verify()


def test_refuses_to_overwrite_non_image(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ImageWriteError, match="refusing to overwrite .*not an hpccr image"):
        write_image(target)
    assert os.listdir(target) == ["precious.txt"]
    assert partial_dirs(tmp_path) == []
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ImageWriteError, match="not an hpccr image"):
        write_image(regular)
    assert regular.read_text() == "x"


def test_abort_leaves_nothing(tmp_path):
    writer = ImageWriter(tmp_path / "ckpt" / "img")
    with PageWriter(writer, PID) as pages:
        pages.write_run(0x1000, bytes(PAGE_SIZE))
    writer.open_stream("unfinished").write(b"x")
    writer.abort()
    writer.abort()
    assert os.listdir(tmp_path / "ckpt") == []
    with pytest.raises(RuntimeError), ImageWriter(tmp_path / "ckpt" / "img") as writer:
        writer.write_bytes("a", b"a")
        raise RuntimeError
    assert os.listdir(tmp_path / "ckpt") == []


def test_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageWriteError, match="cannot write image"):
        ImageWriter(tmp_path / "file" / "img")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    write_image(path)
    return path


def test_flipped_byte(image):
    pages = image / pages_name(PID)
    with open(pages, "r+b") as f:
        f.seek(PAGE_SIZE * 200 + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ImageCorrupt, match=rf"{pages_name(PID)}: checksum mismatch"):
        ImageReader(image).verify()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("flipped_page", [None, 300, 10, 1256],
                         ids=["intact", "asked-for", "skipped", "after-the-last"])
def test_pages_checked_as_they_are_read(image, flipped_page):
    """A restore's pages are checked as they are read through (verify(deferred=is_pages)):
    the whole file in order, the pages not asked for hashed too, the checksum compared after
    the last piece; a flipped byte anywhere fails there, and verify_deferred() fails for a
    file no one read through."""
    if flipped_page is not None:
        flip_byte(image / pages_name(PID), flipped_page * PAGE_SIZE + 17)
    reader = ImageReader(image)
    reader.verify(deferred=is_pages)
    assert reader.deferred(pages_name(PID))
    wanted = [(256 * PAGE_SIZE, 100 * PAGE_SIZE), (600 * PAGE_SIZE, 200 * PAGE_SIZE)]
    got = []
    with PageReader(reader, PID) as pages:
        chunks = pages.chunks(wanted, 1)
        try:
            for chunk in chunks:
                got.append(bytes(chunk))
                chunk.release()
        except ImageCorrupt as exc:
            assert flipped_page is not None
            assert f"{pages_name(PID)}: checksum mismatch" in str(exc)
            assert len(got) == 2  # after the last piece
            with pytest.raises(ImageCorrupt, match="checksum mismatch"):
                reader.verify_deferred()
            return
    assert flipped_page is None, "a flipped byte went through"
    assert got == [pattern(0x20000000, 100), pattern(0x20000000 + 344 * PAGE_SIZE, 200)]
    assert not reader.deferred(pages_name(PID))
    reader.verify_deferred()


def test_deferred_pages_nobody_read(image):
    flip_byte(image / pages_name(PID), 5 * PAGE_SIZE)
    reader = ImageReader(image)
    reader.verify(deferred=is_pages)  # the pages' content is left for later
    with pytest.raises(ImageCorrupt, match=rf"{pages_name(PID)}: checksum mismatch"):
        reader.verify_deferred()


def test_truncated(image):
    os.truncate(image / f"xstate-{PID}.bin", 100)
    with pytest.raises(ImageCorrupt, match="truncated"):
        ImageReader(image).verify()


def test_grown(image):
    with open(image / "image.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ImageCorrupt, match="image.json: size"):
        ImageReader(image).verify()


def test_missing_file(image):
    os.unlink(image / pagemap_name(PID))
    with pytest.raises(ImageCorrupt, match=f"{pagemap_name(PID)} missing"):
        ImageReader(image).verify()


def test_extra_file(image):
    (image / "intruder").write_bytes(b"")
    with pytest.raises(ImageCorrupt, match="intruder: unexpected file"):
        ImageReader(image).verify()


def test_symlink_instead_of_file(image):
    target = image / f"xstate-{PID}.bin"
    os.rename(target, image.parent / "elsewhere")
    os.symlink(image.parent / "elsewhere", target)
    with pytest.raises(ImageCorrupt, match="not a regular file"):
        ImageReader(image).verify()
    with pytest.raises(ImageCorrupt, match="not a regular file"):
        ImageReader(image).read_bytes(f"xstate-{PID}.bin")


def test_hard_link_to_another_owners_file(image, tmp_path):
    """An image file that is a hard link to a file of another uid (with the very content and
    checksum the image lists: a user who could link but not read it could still know it) is
    refused (11) on verify and on open, before a byte of it is read."""
    name = f"xstate-{PID}.bin"
    theirs = tmp_path / "theirs"
    theirs.write_bytes((image / name).read_bytes())
    os.chown(theirs, 12345, 12345)
    os.unlink(image / name)
    os.link(theirs, image / name)
    message = rf"{name} belongs to uid 12345, not to the image's owner \(uid 0\): refused"
    with pytest.raises(AccessDenied, match=message):
        ImageReader(image).verify()
    with pytest.raises(AccessDenied, match=message):
        ImageReader(image).read_bytes(name)


def test_file_replaced_after_it_was_checked(image, tmp_path):
    """Time of check, time of use: a file renamed over a checked one (same name, same content
    even), or one rewritten in place, after verify() is refused when it is opened for use."""
    name = f"xstate-{PID}.bin"
    reader = ImageReader(image)
    reader.verify()
    (tmp_path / "new").write_bytes((image / name).read_bytes())
    os.rename(tmp_path / "new", image / name)
    with pytest.raises(ImageCorrupt, match=f"{name} was replaced or changed after it was checked"):
        reader.read_bytes(name)
    reader = ImageReader(image)
    reader.verify()
    content = (image / "image.json").read_bytes()
    with open(image / "image.json", "r+b") as f:
        f.write(content)  # the same bytes: only the file's change time tells
    with pytest.raises(ImageCorrupt, match="image.json was replaced or changed after"):
        reader.meta()
    assert ImageReader(image).meta()["hostname"] == "new"  # checked afresh, it reads


def test_directory_swapped_after_it_was_opened(image, tmp_path):
    """The image directory is opened once: renamed away and replaced by another image after
    that, the reader still reads and verifies the directory it opened, not the new one."""
    reader = ImageReader(image)
    os.rename(image, tmp_path / "moved")
    write_image(image, tag="swapped")
    reader.verify()
    assert reader.meta()["hostname"] == "new"
    assert ImageReader(image).meta()["hostname"] == "swapped"


@pytest.mark.parametrize(
    "content",
    [b"", b"xxh3-128 abc  1  image.json\n", b"xxh3-128 " + b"0" * 32 + b"  1  ../etc/passwd\n",
     b"xxh3-128 " + b"0" * 32 + b"  1  image.json", b"\xff\n"],
)
def test_malformed_checksums(image, content):
    (image / "checksums").write_bytes(content)
    with pytest.raises(ImageCorrupt):
        reader = ImageReader(image)
        reader.verify()
        reader.meta()


def test_missing_checksums(image):
    os.unlink(image / "checksums")
    with pytest.raises(ImageCorrupt, match="checksums missing"):
        ImageReader(image)


def test_not_found(tmp_path):
    with pytest.raises(ImageNotFound, match="no checkpoint image at"):
        ImageReader(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageNotFound):
        ImageReader(tmp_path / "file")
    with pytest.raises(ImageNotFound):
        ImageReader(tmp_path)


def test_names_are_confined(image):
    reader = ImageReader(image)
    for name in ("../img/image.json", ".hidden", "checksums", "not-listed"):
        with pytest.raises(ImageCorrupt):
            reader.read_bytes(name)


def write_meta(path, meta_bytes: bytes) -> ImageReader:
    with ImageWriter(path) as writer:
        writer.write_bytes("image.json", meta_bytes)
        writer.commit()
    return ImageReader(path)


def _mutate(edit):
    meta = fake_meta()
    edit(meta)
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    ("meta_bytes", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
        (b"[1, 2]", "not an hpccr image"),
        (_mutate(lambda m: m.update(format_version=2)), "unsupported image format version 2"),
        (_mutate(lambda m: m.update(format_version=True)), "unsupported image format version"),
        (_mutate(lambda m: m.pop("processes")), "missing 'processes'"),
        (_mutate(lambda m: m.update(processes={})), "expected a list"),
        (_mutate(lambda m: m["processes"].append(7)), "expected an object"),
        (_mutate(lambda m: m["processes"][0].update(pid="4242")), "expected an integer"),
        (_mutate(lambda m: m["processes"][0]["threads"][0]["regs"].update(rip=-1)),
         "unsigned 64-bit"),
        (_mutate(lambda m: m["processes"][0]["vmas"][1].update(file=3)), "unexpected value"),
        (_mutate(lambda m: m["processes"][0]["fds"][0].update(cloexec=0)), "expected bool"),
        (_mutate(lambda m: m.update(root_pid=1)), "not in the image"),
        (_mutate(lambda m: m["processes"].append(copy.deepcopy(m["processes"][0]))),
         "duplicate pid"),
        (_mutate(lambda m: m["processes"][0]["threads"].reverse()), "leader must come first"),
        (_mutate(lambda m: m["processes"][0].update(main_thread_exited=True)),
         "leader must come first, unless it has exited"),
        (_mutate(lambda m: (m["processes"][0]["threads"].reverse(),
                            m["processes"][0].update(main_thread_exited=True))),
         "its exited main thread is listed"),
    ],
)
def test_bad_image_json(tmp_path, meta_bytes, message):
    reader = write_meta(tmp_path / "img", meta_bytes)
    reader.verify()  # the checksums are right; the content is not
    with pytest.raises(ImageCorrupt, match=message):
        reader.meta()
    with pytest.raises(ImageCorrupt):
        render(tmp_path / "img")


def _pages_image(path, pagemap: bytes, pages: bytes) -> ImageReader:
    with ImageWriter(path) as writer:
        writer.write_bytes(pagemap_name(PID), pagemap)
        writer.write_bytes(pages_name(PID), pages)
        writer.commit()
    return ImageReader(path)


def _records(*runs) -> bytes:
    return b"".join(v.to_bytes(8, "little") + n.to_bytes(8, "little") for v, n in runs)


@pytest.mark.parametrize(
    ("pagemap", "pages", "message"),
    [
        (_records((0x1000, 1))[:-1], bytes(PAGE_SIZE), "truncated record"),
        (_records((0x1001, 1)), bytes(PAGE_SIZE), "invalid run"),
        (_records((0x1000, 0)), b"", "invalid run"),
        (_records(((1 << 64) - PAGE_SIZE, 2)), bytes(2 * PAGE_SIZE), "invalid run"),
        (_records((0x1000, 1 << 60)), bytes(PAGE_SIZE), "invalid run"),
        (_records((0x1000, 2), (0x2000, 1)), bytes(3 * PAGE_SIZE), "overlap"),
        (_records((0x1000, 2)), bytes(PAGE_SIZE), "pagemap lists 8192"),
        (_records((0x1000, 1)), bytes(PAGE_SIZE + 1), "pagemap lists 4096"),
    ],
)
def test_bad_pagemap(tmp_path, pagemap, pages, message):
    reader = _pages_image(tmp_path / "img", pagemap, pages)
    reader.verify()
    with pytest.raises(ImageCorrupt, match=message):
        PageReader(reader, PID)


_CRASH_CHILD = """
import os, signal, sys
from hpccr.image import ImageWriter, PageWriter, store
mode, path = sys.argv[1], sys.argv[2]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "before-swap":
    store._exchange = die
elif mode == "after-swap":
    real = store._exchange
    store._exchange = lambda a, b: (real(a, b), die())
writer = ImageWriter(path)
pages = PageWriter(writer, 4242)
pages.write_run(0x1000, bytes(1 << 20))
if mode == "mid-write":
    die()
pages.close()
writer.write_bytes("image.json", b"{}")
writer.commit()
"""


@pytest.mark.parametrize("mode", ["mid-write", "before-swap", "after-swap"])
def test_crash_keeps_a_valid_image(image, mode):
    """A writer killed at any point leaves a complete image (the old or the new) in place."""
    proc = subprocess.run([sys.executable, "-c", _CRASH_CHILD, mode, str(image)],
                          cwd=Path(__file__).parents[1], check=False)
    assert proc.returncode == -signal.SIGKILL
    reader = ImageReader(image)
    reader.verify()
    if mode == "after-swap":
        assert reader.read_bytes("image.json") == b"{}"
    else:
        assert reader.meta()["hostname"] == "new"


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full(tiny_fs):
    image = tiny_fs / "img"
    write_image(image, "old", runs=[(0x1000, 16)])
    with pytest.raises(ImageWriteError, match=f"cannot write image .*{image}.*No space left"):
        write_image(image, "new", runs=[(0x1000, 1024)])
    reader = ImageReader(image)
    reader.verify()
    assert reader.meta()["hostname"] == "old"
    assert partial_dirs(tiny_fs) == []


def test_render_text(image):
    text = render(image)
    assert "checksums   OK" in text
    assert f"process {PID} (solver)" in text
    assert "/scratch/run/out.log" in text
    assert "O_WRONLY|O_APPEND" in text
    assert "clock_nanosleep (230)" in text
    assert "SIGUSR1 (process)" in text and f"SIGUSR2 (thread {PID + 1})" in text
    assert "xfeatures 0x2e7" in text
    assert "solver --steps '10 000'" in text
    assert "1257 pages saved (4.9 MiB)" in text
    assert "handlers: 1," in text


def test_render_reports_mismatch(image):
    with open(image / f"xstate-{PID}.bin", "r+b") as f:
        f.write(b"\1")
    text = render(image)
    assert f"checksums   MISMATCH in xstate-{PID}.bin" in text
    doc = json.loads(render(image, as_json=True))
    assert doc["checksums_ok"] is False
    assert [f["name"] for f in doc["files"] if not f["ok"]] == [f"xstate-{PID}.bin"]


def test_render_json(image):
    doc = json.loads(render(image, as_json=True))
    assert doc["checksums_ok"] is True
    assert doc["image"]["processes"][0]["fds"][1]["path"] == "/scratch/run/out.log"
    assert {f["name"] for f in doc["files"]} == set(ImageReader(image).files)


def test_render_missing_image(tmp_path):
    with pytest.raises(ImageNotFound):
        render(tmp_path / "nothing")


def test_writer_is_single_use(tmp_path):
    writer = ImageWriter(tmp_path / "img")
    writer.write_json("image.json", fake_meta())
    writer.commit()
    with pytest.raises(ValueError):
        writer.commit()
    writer.abort()  # a no-op after commit
    ImageReader(tmp_path / "img").verify()


# --- incremental images (image/chain.py) ----------------------------------------------------

def write_child(path, parent_path, runs, inherited, record=None, fill=b"\xab"):
    """An image of PID whose pages `runs` are its own (filled with `fill`) and whose
    `inherited` (start, end) spans are its parent's."""
    meta = fake_meta(PID, sum(nr for _, nr in runs))
    parent = ImageReader(parent_path)
    meta["parent"] = record or chain.parent_record(parent)
    parent.close()
    with ImageWriter(path) as writer:
        with PageWriter(writer, PID) as pages:
            for vaddr, nr in runs:
                pages.write_run(vaddr, memoryview(fill * (nr * PAGE_SIZE)))
        writer.write_bytes(inherited_name(PID), pack_runs(inherited))
        for thread in meta["processes"][0]["threads"]:
            writer.write_bytes(thread["xstate"], bytes(2696))
        writer.write_json("image.json", meta)
        return writer.commit()


def memory_through_chain(path, pid: int = PID,
                         parent_of: dict[int, int] | None = None) -> dict[int, bytes]:
    """page address -> content, as a restore would write it (memory.write_pages)."""
    reader = ImageReader(path)
    reader.verify()
    reader.parents = chain.open_parents(reader)
    memory = {}
    for pages, spans in chain.page_sources(reader, reader.parents, pid, parent_of or {}):
        with pages:
            pieces = []
            for vaddr, nr, offset in pages.runs:
                for start, end in ([(vaddr, vaddr + nr * PAGE_SIZE)] if spans is None else
                                   intersect(spans, [(vaddr, vaddr + nr * PAGE_SIZE)])):
                    pieces.append((start, offset + start - vaddr, end - start))
            chunks = pages.chunks([(at, size) for _, at, size in pieces], 1)
            for (start, _, size), chunk in zip(pieces, chunks, strict=True):
                for page in range(0, size, PAGE_SIZE):
                    assert start + page not in memory, "a page written twice"
                    memory[start + page] = bytes(chunk[page:page + PAGE_SIZE])
                if isinstance(chunk, memoryview):
                    chunk.release()
            chunks.close()
    reader.close()
    return memory


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_chain_of_incremental_images(tmp_path, compress):
    """A grandchild that wrote 5 pages over a child that wrote 10 over a full parent: every
    page comes from the newest image that holds it, each once; a page the chain does not hold,
    a parent gone, replaced by another image, or named outside the series, is refused (13)."""
    series = tmp_path / "series"
    full = write_image(series / "ckpt-0001", compress=compress)
    spans = [(vaddr, vaddr + nr * PAGE_SIZE) for vaddr, nr in RUNS]
    child_own = [(0x20000000 + 10 * PAGE_SIZE, 10)]
    child = write_child(series / "ckpt-0002", full, child_own,
                        subtract(spans, [(0x20000000 + 10 * PAGE_SIZE,
                                          0x20000000 + 20 * PAGE_SIZE)]), fill=b"\x01")
    newest_own = [(0x20000000 + 18 * PAGE_SIZE, 5)]
    newest = write_child(series / "ckpt-0003", child, newest_own,
                         subtract(spans, [(0x20000000 + 18 * PAGE_SIZE,
                                           0x20000000 + 23 * PAGE_SIZE)]), fill=b"\x02")
    memory = memory_through_chain(newest)
    expected = {}
    for vaddr, nr in RUNS:
        for i in range(nr):
            expected[vaddr + i * PAGE_SIZE] = pattern(vaddr + i * PAGE_SIZE, 1)
    for (vaddr, nr), fill in ((child_own[0], b"\x01"), (newest_own[0], b"\x02")):
        for i in range(nr):
            expected[vaddr + i * PAGE_SIZE] = fill * PAGE_SIZE
    assert memory.keys() == expected.keys()
    assert [a for a in expected if memory[a] != expected[a]] == []
    assert render(newest).count("pages of its own") == 3

    beyond = write_child(tmp_path / "series" / "ckpt-0004", newest, [],
                         spans + [(0x30000000, 0x30001000)])
    with pytest.raises(ImageCorrupt, match="no parent image holds"):
        memory_through_chain(beyond)
    for name in ("..", "../series/ckpt-0003", "ckpt-0003/"):
        odd = write_child(tmp_path / "series" / f"odd-{len(name)}", newest, [], spans,
                          record={"image": name, "checksums": "0" * 64})
        with pytest.raises(ImageCorrupt, match="invalid parent image name|not the parent"):
            memory_through_chain(odd)
    (series / "ckpt-0002").rename(tmp_path / "aside")
    with pytest.raises(ImageCorrupt, match="gone: the chain is broken"):
        memory_through_chain(newest)
    write_image(series / "ckpt-0002", tag="another")
    with pytest.raises(ImageCorrupt, match="not the parent image"):
        memory_through_chain(newest)
    assert "BROKEN" in render(newest)


# --- pages a process shares with its parent process since fork --------------------------------

CHILD = PID + 10


def write_forked(path, forked: list[tuple[int, int]], own=((0x20000000 + 5 * PAGE_SIZE, 3),)):
    """An image of process PID (RUNS) and its child CHILD, whose pages `own` are its own (filled
    with 7s) and whose `forked` (start, end) spans it shares with PID."""
    meta = fake_meta(PID, sum(nr for _, nr in RUNS))
    child = copy.deepcopy(meta["processes"][0])
    child.update(pid=CHILD, ppid=PID, nr_pages=sum(nr for _, nr in own))
    for i, thread in enumerate(child["threads"]):
        thread.update(tid=CHILD + i, xstate=f"xstate-{CHILD + i}.bin")
    meta["processes"].append(child)
    with ImageWriter(path) as writer:
        for pid, runs, fill in ((PID, RUNS, None), (CHILD, own, b"\x07")):
            with PageWriter(writer, pid) as pages:
                for vaddr, nr in runs:
                    pages.write_run(vaddr, memoryview(fill * (nr * PAGE_SIZE) if fill
                                                      else pattern(vaddr, nr)))
        for proc in meta["processes"]:
            for thread in proc["threads"]:
                writer.write_bytes(thread["xstate"], bytes(2696))
        writer.write_bytes(forked_name(CHILD), pack_runs(forked))
        writer.write_json("image.json", meta)
        return writer.commit()


def test_pages_shared_with_the_parent_process(tmp_path):
    """A child's pages shared since fork come from its parent's, its own from its own; a shared
    page its parent does not hold, or a root that claims a parent, is refused (13)."""
    start = 0x20000000
    forked = [(0x10000000, 0x10000000 + 256 * PAGE_SIZE), (start, start + 5 * PAGE_SIZE)]
    image = write_forked(tmp_path / "img", forked)
    memory = memory_through_chain(image, CHILD, {CHILD: PID})
    expected = {start + i * PAGE_SIZE: b"\x07" * PAGE_SIZE for i in range(5, 8)}
    for begin, end in forked:
        for vaddr in range(begin, end, PAGE_SIZE):
            expected[vaddr] = pattern(vaddr, 1)
    assert memory.keys() == expected.keys()
    assert [a for a in expected if memory[a] != expected[a]] == []
    assert "261 shared with its parent since fork" in render(image)

    beyond = write_forked(tmp_path / "beyond", [(0x30000000, 0x30001000)])
    with pytest.raises(ImageCorrupt, match="whose pages do not hold them"):
        memory_through_chain(beyond, CHILD, {CHILD: PID})
    with pytest.raises(ImageCorrupt, match="a parent process that the image does not hold"):
        memory_through_chain(image, CHILD, {})
