"""Helpers shared by descriptor kinds: a dumper-side copy of a target's descriptor, C memory
for the arguments of raw system calls, and the image files that hold saved data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from hpccr import native
from hpccr.engine import procfs

NOT_REOPENED = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY  # flags that acted at open


def held_files(pids) -> Iterator[tuple[int, int, os.stat_result]]:
    """(process, descriptor, the file's stat) of every descriptor of `pids`, in pid order
    (those that close meanwhile left out): what a kind that must know every holder of its
    files reads once per dump."""
    for pid in sorted(pids):
        for fd in procfs.fds(pid):
            try:
                yield pid, fd, os.stat(procfs.path(pid, "fd", str(fd)))
            except OSError:
                continue


@contextlib.contextmanager
def borrowed(pid: int, fd: int) -> Iterator[int]:
    """A descriptor of this process for the open file behind `fd` of `pid` (pidfd_getfd).
    It shares the target's open file description, so only non-destructive calls are allowed."""
    pidfd = native.pidfd_open(pid)
    try:
        copy = native.syscall("pidfd_getfd", pidfd, fd, 0)
    finally:
        os.close(pidfd)
    try:
        yield copy
    finally:
        os.close(copy)


def cbuf(data: bytes | int):
    """C memory holding `data` (or that many zero bytes) and its address, for a syscall argument.
    Keep the first value alive while the address is in use."""
    buf = native.ffi.new("char[]", data)
    return buf, int(native.ffi.cast("uintptr_t", buf))


def saved_file(ctx, name: str) -> int:
    """Image file `name`, opened with the rights of the process's owner (root's for an image
    only root could have written), like the files it reopens."""
    ctx.reader.path_of(name)  # a listed name
    return ctx.as_owner(os.open, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=ctx.reader.dir_fd)


def saved_data(ctx, name: str) -> bytes:
    """The content of image file `name` (see saved_file)."""
    with os.fdopen(saved_file(ctx, name), "rb") as f:
        return f.read()
