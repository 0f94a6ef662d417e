"""Processes that share their descriptor table (CLONE_FILES) and/or their cwd, root and umask
(CLONE_FS), and maybe their address space (CLONE_VM) and signal handlers (CLONE_SIGHAND), with
their parent without being its threads.

Dump: kcmp finds them (tree.py), and each process records what it shares with its parent.
Restore:
- cwd and umask alone: the process is forked by its parent like the others, with CLONE_FS;
  exec keeps an fs_struct shared.
- a descriptor table: exec gives the caller a table of its own, so such a process cannot be
  forked and exec'd like the others.  Once its parent is a stub, an injected clone3 in the
  parent makes it ("injected"), with the tables shared and its saved pid; then it is rebuilt
  like any other process (restore.py).  Supported for a process in its parent's session and
  group, with no children of its own, no parent-death signal, not a child subreaper, and,
  unless it shares them too, with its parent's cwd and umask.
- an address space too (with or without the signal handlers: clone as LinuxThreads did, with
  CLONE_VM|CLONE_FS|CLONE_FILES[|CLONE_SIGHAND]): made the same way, its memory is its parent's
  and is not saved twice; it is rebuilt by its parent's injector once the parent's memory is
  back, like a thread with a signal state of its own (restore.py).  Supported when it has one
  thread and no POSIX timers.
Any other sharing is refused at dump (and an image that claims it, at restore).
"""

from __future__ import annotations

from hpccr.errors import UnsupportedResource

FILES, FS, VM, SIGHAND = "files", "fs", "vm", "sighand"
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
FLAGS = {FILES: CLONE_FILES, FS: CLONE_FS, VM: CLONE_VM, SIGHAND: CLONE_SIGHAND}
NAMES = {FILES: "its descriptor table (CLONE_FILES)", FS: "its cwd and umask (CLONE_FS)",
         VM: "its address space (CLONE_VM)", SIGHAND: "its signal handlers (CLONE_SIGHAND)"}


def shares(proc: dict) -> list[str]:
    return proc["shares_with_parent"]


def clone_flags(proc: dict) -> int:
    flags = 0
    for kind in shares(proc):
        flags |= FLAGS[kind]
    return flags


def injected(proc: dict) -> bool:
    """Made by a clone3 injected in its parent's stub (it shares its descriptor table)."""
    return FILES in shares(proc)


def shares_memory(proc: dict) -> bool:
    """Is its address space its parent's (CLONE_VM)?"""
    return VM in shares(proc)


def fork_flags(proc: dict) -> int:
    """The clone flags its parent forks it with (a process not injected)."""
    return 0 if injected(proc) else clone_flags(proc)


def check(procs: list[dict]) -> None:
    """Refuse (UnsupportedResource) a sharing hpccr cannot recreate."""
    by_pid = {p["pid"]: p for p in procs}
    parents = {p["ppid"] for p in procs}
    for proc in procs:
        kinds = shares(proc)
        if not kinds:
            continue
        parent = by_pid.get(proc["ppid"])
        why = _problem(proc, parent, proc["pid"] in parents)
        if why:
            what = " and ".join(NAMES.get(k, repr(k)) for k in kinds)
            raise UnsupportedResource(f"process {proc['pid']} shares {what} with its parent, "
                                      f"process {proc['ppid']}, but {why}: not supported yet")


def _problem(proc: dict, parent: dict | None, has_children: bool) -> str | None:
    kinds = set(shares(proc))
    if parent is None or not kinds <= set(FLAGS):
        return "its parent is not in the image"
    if SIGHAND in kinds and VM not in kinds:
        return "signal handlers are shared only with an address space"
    if VM in kinds and not {FILES, FS} <= kinds:
        return "it does not share its descriptor table and cwd too"
    if VM in kinds and (len(proc["threads"]) != 1 or proc["posix_timers"]):
        return "it has threads or POSIX timers of its own"
    if FILES not in kinds:
        return None  # forked with CLONE_FS, like any other child
    if proc["exit_status"] is not None or parent["exit_status"] is not None:
        return "one of them has exited"
    if has_children:
        return "it has children"
    if (proc["sid"], proc["pgid"]) != (parent["sid"], parent["pgid"]):
        return "it is in another session or process group"
    if proc["pdeathsig"] or proc["child_subreaper"]:
        return "it has a parent-death signal or is a child subreaper"
    if FS not in kinds and (proc["cwd"], proc["umask"]) != (parent["cwd"], parent["umask"]):
        return "its cwd or umask differs"
    return None
