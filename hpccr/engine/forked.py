"""Pages a process shares with its parent since fork, shared again on restore.

Dump (memory.shared_with_parent): the pages a child still shares with its parent since its
fork, the same page frame at the same address, are saved once, with the parent's
(``forked-<pid>.bin``, image/chain.py).

Restore: a task forked by the restorer that exec'd the stub has an address space of its own,
and every page written into it is a copy: a forked worker pool over one data set would use that
memory once per worker.  So such a child is forked the way it was the first time: by its
parent, a clone3 with its pid injected in the parent's stub once the parent's pages are back
(before their protections and madvise state are set).  It then holds its parent's address
space, copy-on-write.  Its rebuild keeps those of its private anonymous VMAs that lie inside
one of its parent's and hold pages it shares with it, drops the pages there that it did not
share (MADV_DONTNEED), unmaps everything else and maps what is its own, as for any task.

What the restorer gives any other task before it becomes the stub — its descriptors, with all
that fds/ does to them, and its cwd — a *donor* gets instead: a task forked with a spare pid by
the nearest ancestor the restorer forks itself, which execs the stub holding them (its cwd as
one more descriptor, `cwd_fd`) and dies with that ancestor.  The child takes them with
pidfd_getfd, and the donor ends, reaped by that ancestor's stub.  The child's session or group,
umask, personality and prctl attributes are set by injected calls.

The child's own children are forked from it in turn once its pages are back (all the address
spaces of such a subtree are made before anything else of it), and so on: a pool whose workers
fork helpers shares again at every level.  Done for a child that its parent's fork can make:
in its parent's group (or leading its own) and session (or leading its own), leading no group
or session that a process outside its subtree joins, nothing shared with the parent as such
(CLONE_FILES, CLONE_FS, CLONE_VM), not a zombie, its main thread still there, no flock lock it
took itself (the donor would be named as the taker), and all its children such children too.
Then it is forked so if it shares pages with its parent, or its parent was forked so.  Any
other child gets its shared pages as copies, as before.
"""

from __future__ import annotations

import fcntl
import os
import resource

from hpccr.engine import fds, memory, procfs, sharing
from hpccr.engine.prctls import PR_SET_CHILD_SUBREAPER
from hpccr.errors import PidInUse
from hpccr.image import ImageReader
from hpccr.image.pages import forked_name
from hpccr.spans import intersect, subtract

PRIVATE_ANONYMOUS = ("anon", "heap", "stack")
MADV_DONTNEED = 4
DONOR_PIDS = 64  # pids a donor tries, from the one it is given (another may be taken meanwhile)
CLOSE_ALL = 0xFFFFFFFF
PID_MAX = "/proc/sys/kernel/pid_max"
FIRST_WRAPPED_PID = 301  # where the kernel starts again past pid_max (RESERVED_PIDS)


def donor_pids(first: int, taken: set[int], in_use_now: bool) -> int:
    """The first of DONOR_PIDS pids for a donor, from `first` on (wrapping below pid_max as
    the kernel does): none of them `taken` by a task nor, outside a new pid namespace, in use
    now."""
    with open(PID_MAX) as f:
        limit = int(f.read())
    start = first
    for _ in range(limit // DONOR_PIDS + 1):
        if start + DONOR_PIDS > limit:
            start = FIRST_WRAPPED_PID
        pids = range(start, start + DONOR_PIDS)
        if not any(pid in taken or (in_use_now and os.path.exists(f"/proc/{pid}"))
                   for pid in pids):
            return start
        start += DONOR_PIDS
    raise PidInUse(f"no {DONOR_PIDS} free pids for a process's donor")


def may_fork(proc: dict, parent: dict, procs: list[dict], subtree: set[int]) -> bool:
    """Whether process `proc`, a child of `parent`, can be forked by its parent's stub (its
    children too: `subtree`, its pids and its descendants', are all forked so)."""
    pid = proc["pid"]
    return (proc["exit_status"] is None and parent["exit_status"] is None
            and not sharing.shares(proc) and not sharing.shares(parent)
            and not proc["main_thread_exited"] and not parent["main_thread_exited"]
            and proc["sid"] in (pid, parent["sid"]) and proc["pgid"] in (pid, parent["pgid"])
            and not any(p["pid"] not in subtree and pid in (p["sid"], p["pgid"])
                        for p in procs)
            and not any(lock.get("holder") for e in proc["fds"] for lock in e["locks"])
            and cwd_fd(proc) < resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def shares_pages(pid: int, reader: ImageReader) -> bool:
    """Whether process `pid` of the image shares pages with its parent since fork."""
    return forked_name(pid) in reader.files


def cwd_fd(proc: dict) -> int:
    """The descriptor number at which the donor of `proc` holds its cwd."""
    return max([e["fd"] for e in proc["fds"]] + [2]) + 1


def hold_cwd(proc: dict) -> None:
    """In the donor, after its descriptors: its cwd as descriptor cwd_fd(proc), inheritable."""
    cwd, at = os.open(".", os.O_PATH | os.O_DIRECTORY), cwd_fd(proc)
    if cwd == at:
        os.set_inheritable(cwd, True)
    else:
        os.dup2(cwd, at)
        os.close(cwd)


def take_from_donor(inj, proc: dict, donor: int) -> None:
    """In the new child, a copy of its parent's stub: its descriptors and cwd from its donor
    (pid `donor`), its parent's closed; then its session or group, umask, personality and
    child-subreaper attribute."""
    inj.call("setfsuid", 0)  # the donor entered its cwd with the process's rights: no check
    inj.call("setfsgid", 0)
    inj.call("close_range", 0, CLOSE_ALL, 0)
    first = inj.call("pidfd_open", donor, 0)
    pidfd = inj.call("fcntl", first, fcntl.F_DUPFD_CLOEXEC, cwd_fd(proc) + 1)
    inj.call("close", first)
    try:
        for e in fds.opened_early(proc["fds"]):
            got = inj.call("pidfd_getfd", pidfd, e["fd"], 0)  # the lowest free number
            if got == e["fd"]:
                inj.call("fcntl", got, fcntl.F_SETFD, 0)  # pidfd_getfd sets close-on-exec
            else:
                inj.call("dup3", got, e["fd"], 0)
                inj.call("close", got)
        cwd = inj.call("pidfd_getfd", pidfd, cwd_fd(proc), 0)
        inj.call("fchdir", cwd)
        inj.call("close", cwd)
    finally:
        inj.call("close", pidfd)
    if proc["sid"] == proc["pid"]:
        inj.call("setsid")
    elif proc["pgid"] == proc["pid"]:
        inj.call("setpgid", 0, 0)
    inj.call("umask", proc["umask"])
    inj.call("personality", proc["personality"])
    inj.call("prctl", PR_SET_CHILD_SUBREAPER, proc["child_subreaper"])


def clear(inj, pid: int, vmas: list[dict], parents_scratch: int,
          shared: list[tuple[int, int]]) -> tuple[list[procfs.MapsEntry], list[tuple[int, int]]]:
    """Unmap from the new child `pid` all of its parent's address space but the private
    anonymous VMAs it had there too (`vmas`: its saved ones) that hold pages it `shared` with
    its parent, and the special mappings; returns those (to move, as after clear_stub) and the
    (start, end) of the VMAs kept."""
    current = procfs.maps(pid)
    parents = [(e.start, e.end) for e in current
               if e.start not in (inj.base, parents_scratch) and not e.shared and e.inode == 0
               and (e.name in ("", "[heap]") or e.name.startswith(("[stack", "[anon")))]
    kept = [(v["start"], v["end"]) for v in vmas
            if v["kind"] in PRIVATE_ANONYMOUS and not v["shared"]
            and any(start <= v["start"] and v["end"] <= end for start, end in parents)
            and intersect([(v["start"], v["end"])], shared)]
    specials = []
    for e in current:
        if e.start == inj.base:
            continue
        if e.name in memory.SPECIAL:
            if memory.SPECIAL[e.name] != "vsyscall":
                specials.append(e)
            continue
        for start, end in subtract([(e.start, e.end)], kept):
            inj.call("munmap", start, end - start)
    return specials, kept


def drop_unshared(inj, kept: list[tuple[int, int]], shared: list[tuple[int, int]]) -> None:
    """Of the VMAs `kept`, drop the parent's pages outside the spans the child `shared`, and
    make them writable for its own pages (protect() sets their protection afterwards)."""
    for start, end in subtract(kept, shared):
        inj.call("madvise", start, end - start, MADV_DONTNEED)
    for start, end in kept:
        inj.call("mprotect", start, end - start, memory.PROT_READ | memory.PROT_WRITE)


def protect(inj, vmas: list[dict], kept: list[tuple[int, int]]) -> None:
    """The saved protection of each VMA kept."""
    spans = set(kept)
    for v in vmas:
        if (v["start"], v["end"]) in spans:
            inj.call("mprotect", v["start"], v["end"] - v["start"], memory.prot_bits(v["prot"]))
