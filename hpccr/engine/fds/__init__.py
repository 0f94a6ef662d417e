"""File descriptors: a registry of descriptor kinds, each in its own module.

A kind module has
- ``NAME``, and ``FIELDS``: the schema (hpccr.image.schema) of the fields it adds to an fd entry;
- ``recognise(link, st, state) -> bool``: is this descriptor of that kind (mutually exclusive);
  ``state`` as for dump: sockets are looked up in the kernel's tables, read once per dump;
- ``dump(pid, fd, link, st, state) -> dict``: its fields, read while the processes are frozen;
  ``state`` (DumpState) is shared by the whole dump: the image writer, ghost files, the pids
  being dumped;
- ``check(entry, ctx)``: before any task exists, refuse an entry that cannot be reopened;
- ``open(entry, ctx, pool) -> int``: in the restorer, before the tasks are created, a descriptor
  for the entry's open file description.  Each description is opened once, whichever processes
  share it; the tasks inherit the pool and put each description at its saved numbers;
- optionally ``INSIDE_JOB = True``: its descriptions are made inside the pid namespace a job is
  restored into (by the job's first process, before it forks the others), not by the restorer;
- optionally ``LATE = True``: not opened by the restorer but by the restored process itself,
  once its threads exist, with ``open_late(inj, proc, image_ids)`` (restore.rebuild);
- optionally ``finish(entry, ctx, pool)``: runs in the task once every descriptor is at its
  saved number (the pool's still open), for kinds that refer to other descriptors by number
  (an epoll set adds its watches); once per description, in the first process that holds it.
Adding a kind means adding a module to KINDS; the dump and restore loops below never change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re

from hpccr import native
from hpccr.engine import locks, procfs
from hpccr.engine.fds import (
    epoll,
    eventfd,
    inet,
    inotify,
    memfd,
    mqueue,
    pipe,
    procfile,
    pty,
    regular,
    signalfd,
    timerfd,
    tty,
    unix,
)
from hpccr.errors import AccessDenied, RestoreFailed, UnsupportedResource
from hpccr.image.schema import check_part

KINDS = {k.NAME: k for k in (regular, procfile, memfd, mqueue, tty, pty, pipe, unix, inet,
                              eventfd, timerfd, signalfd, epoll, inotify)}
O_CLOEXEC = 0o2000000
KCMP_EQUAL, KCMP_LESS, KCMP_GREATER = 0, 1, 2  # kcmp(2): the first object is … the second
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


class DumpState:
    """What the descriptor kinds share while one image is dumped."""

    def __init__(self, writer, ghosts, pids, ids, own_network: bool = False):
        self.writer = writer
        self.ghosts = ghosts
        self.pids = set(pids)
        self.ids = ids  # pids as the image records them (dump._Ids)
        self.pidns = ids.pidns  # the job has a pid namespace of its own: its pids are recorded
        self.own_network = own_network  # the job has a network namespace of its own
        self._job_ids: dict[int, int] | None = None
        self._procfs_devices: set[int] | None = None
        self.pipes: set[int] = set()  # pipes whose data an entry already carries
        self.pipe_holders = None  # pipe.Holders: who holds each pipe, made on first use
        self.unix = None  # unix.View of the dump's sockets, made on first use
        self.inet = None  # inet.View: network sockets, their copies and lock; on first use
        self.ptys = None  # numbers of the pseudo-terminals whose master is in the dump
        self.mqueues: set[int] = set()  # message queues whose messages an entry carries
        self.fs_types: dict[int, int] = {}  # device -> its file system's magic (statfs)

    def fs_type(self, device: int) -> int | None:
        """The file system magic of `device`, as dump_fds noted it."""
        return self.fs_types.get(device)

    def job_ids(self) -> dict[int, int]:
        """Every pid and tid of the dump, as the image records them -> its process's pid."""
        if self._job_ids is None:
            self._job_ids = {self.ids.thread(pid, tid): self.ids.of(pid)
                             for pid in self.pids for tid in procfs.tids(pid)}
        return self._job_ids

    def procfs_devices(self) -> set[int]:
        """The devices of the /proc mounts the dumped processes see (their pid namespace's)."""
        if self._procfs_devices is None:
            self._procfs_devices = set()
            for pid in self.pids:
                with contextlib.suppress(OSError):  # a zombie has no root
                    self._procfs_devices.add(os.stat(procfs.path(pid, "root", "proc")).st_dev)
        return self._procfs_devices

    def before_kill(self) -> None:
        """The image is complete and the job is to be killed: nothing may tell the network."""
        if self.inet is not None:
            self.inet.before_kill()

    def finish(self, image: str | None) -> None:
        """The dump is over (also when it failed): `image` if the job was killed for it."""
        if self.inet is not None:
            self.inet.finish(image)


def dump_fds(pid: int, state: DumpState) -> list[dict]:
    """The descriptors of `pid`; `desc` numbers are given by share_descriptions() once every
    process of the dump is done."""
    entries: list[dict] = []
    for fd in procfs.fds(pid):
        fd_path = procfs.path(pid, "fd", str(fd))
        try:
            link = os.readlink(fd_path)
            st = os.stat(fd_path)
            info = procfs.fdinfo(pid, fd)
            if st.st_dev not in state.fs_types:
                state.fs_types[st.st_dev] = native.statfs_type(fd_path)
        except FileNotFoundError:
            continue  # closed meanwhile (cannot happen while frozen, but for other threads)
        kind = next((k for k in KINDS.values() if k.recognise(link, st, state)), None)
        if kind is None:
            raise UnsupportedResource(
                f"process {pid} fd {fd} is {describe(link)}: not supported yet")
        flags = int(info["flags"], 8)
        try:
            entry = {"fd": fd, "kind": kind.NAME, "flags": flags & ~O_CLOEXEC,
                     "pos": int(info["pos"]), "cloexec": bool(flags & O_CLOEXEC),
                     "desc": -1, "ghost": None, "mode": st.st_mode, "path": link,
                     "locks": locks.dump(pid, fd)}
            entry.update(kind.dump(pid, fd, link, st, state))
        except OSError as exc:  # the dump names the process and the step
            raise OSError(exc.errno, f"fd {fd} ({kind.NAME}): {exc.strerror}") from exc
        entries.append(entry)
    return entries


def share_descriptions(fd_tables: dict[int, list[dict]]) -> None:
    """Number every open file description: equal `desc` numbers mean one description shared by
    several descriptors or processes (dup, fork, SCM_RIGHTS).  kcmp(KCMP_FILE) decides, among
    descriptors on the same inode; it also orders descriptions, so each is looked up by binary
    search among those already seen (thousands of descriptors on one inode — /dev/null, a file
    every rank opened — cost thousands of calls, not millions)."""
    seen: dict[tuple[int, int], list[tuple[int, dict]]] = {}  # per inode, in kcmp's order
    count = 0
    for pid, entries in fd_tables.items():
        for entry in entries:
            st = os.stat(procfs.path(pid, "fd", str(entry["fd"])))
            same_inode = seen.setdefault((st.st_dev, st.st_ino), [])
            low, high = 0, len(same_inode)
            while low < high:
                middle = (low + high) // 2
                other_pid, other = same_inode[middle]
                order = native.kcmp(pid, other_pid, native.KCMP_FILE, entry["fd"], other["fd"])
                if order == KCMP_EQUAL:
                    entry["desc"] = other["desc"]
                    break
                if order == KCMP_LESS:
                    high = middle
                elif order == KCMP_GREATER:
                    low = middle + 1
                else:
                    raise OSError(errno.ENOTSUP, "kcmp gives descriptions no order")
            else:
                entry["desc"] = count
                count += 1
                same_inode.insert(low, (pid, entry))


def check_fds(entries: list[dict], ctx) -> None:
    """Before anything is created: fail early if a descriptor cannot be reopened."""
    for e in entries:
        kind = KINDS.get(e["kind"])
        if kind is None:
            raise UnsupportedResource(f"fd {e['fd']}: unknown descriptor kind '{e['kind']}'")
        check_part(e, kind.FIELDS, f"fd {e['fd']}")
        locks.check(e)
        kind.check(e, ctx)


class Pool:
    """Every open file description of the image, opened once by the restorer (close-on-exec,
    above every saved descriptor number) and inherited by the tasks it forks."""

    def __init__(self, tables: list[tuple[object, list[dict]]], tcp_close: bool = False):
        """`tables`: (restore context, fd entries) of every process, in creation order;
        `tcp_close`: connections that cannot come back here come back reset (inet.py)."""
        self.tables = tables
        self.tcp_close = tcp_close
        self.repairing: list = []  # TCP connections still in repair mode (inet.end_repair)
        self.fds: dict[int, int] = {}
        self.pipes: dict[int, int] = {}  # pipe inode -> a read-write descriptor on it
        self.sockets: dict[int, int] | None = None  # unix socket inode -> descriptor, once made
        self.memfds: dict[str, int] = {}  # memfd's ghost file -> the memfd
        self.ptys: dict[int, int] = {}  # saved pseudo-terminal number -> the new pair's master
        self.mqueues: dict[int, int] = {}  # saved message queue inode -> the new queue
        self.late_seals: list[tuple[int, int]] = []  # (a memfd, seals to add once all map it)
        self.finisher: dict[int, tuple[int, int]] = {}  # desc -> (pid, fd) that finishes it
        self.base = max([e["fd"] for _, entries in tables for e in entries] + [2]) + 64

    def entry_with(self, match) -> dict | None:
        return next((e for _, entries in self.tables for e in entries if match(e)), None)

    def description(self, pid: int, fd: int) -> int | None:
        """The open file description that process `pid` (as the image records it) holds as
        `fd`, if any."""
        return next((e["desc"] for ctx, entries in self.tables if ctx.proc["pid"] == pid
                     for e in entries if e["fd"] == fd), None)

    def open_all(self, in_job: bool = True) -> None:
        """Open what is not open yet; `in_job` False: in the restorer, outside the pid namespace
        the job is restored into, where the kinds that must be made inside it wait."""
        for ctx, entries in self.tables:
            for e in entries:
                kind = KINDS[e["kind"]]
                if (e["desc"] in self.fds or getattr(kind, "LATE", False)
                        or not in_job and getattr(kind, "INSIDE_JOB", False)):
                    continue
                with ctx.owner_rights():
                    try:
                        local = kind.open(e, ctx, self)
                    except OSError as exc:
                        error = AccessDenied if isinstance(exc, PermissionError) else \
                            RestoreFailed
                        raise error(
                            f"process {ctx.proc['pid']}, fd {e['fd']} ({e['kind']}): cannot "
                            f"open it again as uid {ctx.fsuid}: {exc.strerror or exc}") from exc
                try:
                    locks.take_on_description(local, e, self._flock_holder(e["desc"]))
                    self.fds[e["desc"]] = fcntl.fcntl(local, fcntl.F_DUPFD_CLOEXEC, self.base)
                finally:
                    os.close(local)
                self.finisher[e["desc"]] = (ctx.proc["pid"], e["fd"])

    def _flock_holder(self, desc: int) -> bool:
        """Does a process of the image hold description `desc`'s flock lock (and take it)?"""
        return self.entry_with(lambda e: e["desc"] == desc and any(
            lock["holder"] for lock in e["locks"])) is not None

    def add_late_seals(self) -> None:
        """Once every restored process has mapped its memfds: the seals that forbid mappings
        made after them."""
        while self.late_seals:
            fd, seals = self.late_seals.pop()
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            finally:
                os.close(fd)

    def end_repair(self) -> None:
        """The restored connections leave repair mode: the tree is about to run."""
        inet.end_repair(self.repairing)

    def close(self, late: bool = False) -> None:
        """Close what the tasks inherited; with `late`, the memfds still to seal and the
        connections still in repair mode (a failed restore: they close without a word)."""
        for fd in [*self.fds.values(), *self.pipes.values(), *(self.sockets or {}).values(),
                   *self.memfds.values(), *self.ptys.values(), *self.mqueues.values(),
                   *(fd for fd, _ in self.late_seals if late)]:
            os.close(fd)
        if late:
            self.late_seals.clear()
            for sock, _ in self.repairing:
                sock.close()
            self.repairing.clear()
        self.fds.clear()
        self.pipes.clear()
        self.memfds.clear()
        self.ptys.clear()
        self.mqueues.clear()
        self.sockets = {}


def opened_early(entries: list[dict]) -> list[dict]:
    """The descriptors a new task gets before it becomes the stub: all but the LATE kinds."""
    return [e for e in entries if not getattr(KINDS[e["kind"]], "LATE", False)]


def install_fds(entries: list[dict], ctx, pool: Pool, keep: int) -> None:
    """In the new task: every saved descriptor at its number (from the pool), all others closed
    but `keep`.  Descriptors stay inheritable here; close-on-exec is set after the stub's exec."""
    entries = opened_early(entries)
    wanted = {e["fd"] for e in entries}
    for e in entries:
        os.dup2(pool.fds[e["desc"]], e["fd"], inheritable=True)
    for e in entries:
        finish = getattr(KINDS[e["kind"]], "finish", None)
        if finish is not None and pool.finisher[e["desc"]] == (ctx.proc["pid"], e["fd"]):
            finish(e, ctx, pool)
    for fd in os.listdir("/proc/self/fd"):
        n = int(fd)
        if n != keep and n not in wanted:
            try:
                os.close(n)
            except OSError:
                pass


def set_cloexec(inj, entries: list[dict]) -> None:
    for e in entries:
        if e["cloexec"]:
            inj.call("fcntl", e["fd"], fcntl.F_SETFD, fcntl.FD_CLOEXEC)
