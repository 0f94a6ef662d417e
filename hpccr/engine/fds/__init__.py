"""File descriptors: a registry of descriptor kinds, each in its own module.

A kind module has
- ``NAME``, and ``FIELDS``: the schema (hpccr.image.schema) of the fields it adds to an fd entry;
- ``recognise(link, st) -> bool``: is this descriptor of that kind (mutually exclusive);
- ``dump(pid, fd, link, st, ghosts) -> dict``: its fields, read while the process is frozen;
  ``ghosts.writer`` stores any bulk data as an image file;
- ``check(entry, ctx)``: before any task exists, refuse an entry that cannot be reopened;
- ``open(entry, ctx, opened) -> int``: in the restored task before the stub is exec'd, a
  descriptor of this process for the entry.  Entries are opened in fd order; ``opened`` maps the
  saved number of each entry opened so far to its descriptor here (a pipe end reopens its pipe);
- optionally ``finish(entry, ctx)``: runs once every descriptor is at its saved number, for kinds
  that refer to other descriptors by number (an epoll set adds its watches).
Adding a kind means adding a module to KINDS; the dump and restore loops below never change.
"""

from __future__ import annotations

import fcntl
import os
import re

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds import epoll, eventfd, pipe, regular, signalfd, timerfd, tty
from hpccr.errors import UnsupportedResource
from hpccr.image.schema import check_part

KINDS = {k.NAME: k for k in (regular, tty, pipe, eventfd, timerfd, signalfd, epoll)}
O_CLOEXEC = 0o2000000
_ANON = re.compile(r"anon_inode:\[?([^\]]+)\]?")


def describe(link: str) -> str:
    """A person's name for what a descriptor refers to."""
    if link.startswith("pipe:"):
        return "a pipe"
    if link.startswith("socket:"):
        return "a socket"
    m = _ANON.match(link)
    if m:
        return f"an {m.group(1)} descriptor"
    return f"'{link}'"


def dump_fds(pid: int, ghosts) -> list[dict]:
    entries: list[dict] = []
    seen: dict[tuple[int, int], list[int]] = {}  # inode -> fds, to find shared descriptions
    for fd in procfs.fds(pid):
        fd_path = procfs.path(pid, "fd", str(fd))
        try:
            link = os.readlink(fd_path)
            st = os.stat(fd_path)
            info = procfs.fdinfo(pid, fd)
        except FileNotFoundError:
            continue  # closed meanwhile (cannot happen while frozen, but for other threads)
        kind = next((k for k in KINDS.values() if k.recognise(link, st)), None)
        if kind is None:
            raise UnsupportedResource(
                f"process {pid} fd {fd} is {describe(link)}: not supported yet")
        flags = int(info["flags"], 8)
        entry = {"fd": fd, "kind": kind.NAME, "flags": flags & ~O_CLOEXEC,
                 "pos": int(info["pos"]), "cloexec": bool(flags & O_CLOEXEC),
                 "same_as": None, "ghost": None, "mode": st.st_mode, "path": link}
        entry.update(kind.dump(pid, fd, link, st, ghosts))
        for other in seen.get((st.st_dev, st.st_ino), []):
            if native.kcmp(pid, pid, native.KCMP_FILE, fd, other) == 0:
                entry["same_as"] = other
                break
        seen.setdefault((st.st_dev, st.st_ino), []).append(fd)
        entries.append(entry)
    return entries


def check_fds(entries: list[dict], ctx) -> None:
    """Before anything is created: fail early if a descriptor cannot be reopened."""
    for e in entries:
        kind = KINDS.get(e["kind"])
        if kind is None:
            raise UnsupportedResource(f"fd {e['fd']}: unknown descriptor kind '{e['kind']}'")
        check_part(e, kind.FIELDS, f"fd {e['fd']}")
        kind.check(e, ctx)


def install_fds(entries: list[dict], ctx, keep: int) -> None:
    """In the new task: open every saved descriptor at its number, close all others but `keep`.
    Descriptors stay inheritable here; close-on-exec is set after the stub's exec."""
    wanted = {e["fd"] for e in entries}
    base = max(wanted | {keep, 2}) + 1
    staged: dict[int, int] = {}
    for e in entries:
        if e["same_as"] is not None and e["same_as"] in staged:
            tmp = os.dup(staged[e["same_as"]])
        else:
            tmp = KINDS[e["kind"]].open(e, ctx, staged)
        staged[e["fd"]] = fcntl.fcntl(tmp, fcntl.F_DUPFD_CLOEXEC, base)
        os.close(tmp)
    for fd in os.listdir("/proc/self/fd"):
        n = int(fd)
        if n not in staged.values() and n != keep and n not in wanted:
            try:
                os.close(n)
            except OSError:
                pass
    for target, tmp in staged.items():
        os.dup2(tmp, target, inheritable=True)
        os.close(tmp)
    for e in entries:
        finish = getattr(KINDS[e["kind"]], "finish", None)
        if finish is not None and e["same_as"] is None:
            finish(e, ctx)


def set_cloexec(inj, entries: list[dict]) -> None:
    for e in entries:
        if e["cloexec"]:
            inj.call("fcntl", e["fd"], fcntl.F_SETFD, fcntl.FD_CLOEXEC)
