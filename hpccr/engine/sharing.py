"""Processes that share their descriptor table (CLONE_FILES) — and maybe their cwd, root and
umask (CLONE_FS) — with their parent without being its threads.

Dump: kcmp finds them (tree.py), and each process records what it shares with its parent.
Restore: such a process cannot be made like the others, by fork and exec of the stub, since
exec gives the caller a descriptor table of its own.  Once its parent is a stub, an injected
clone3 in the parent makes it, with those tables shared and its saved pid; then it is rebuilt
like any other process (restore.py).

Supported: a process sharing its parent's descriptor table (and maybe cwd/umask), in its
parent's session and group, with no children of its own, no parent-death signal, not a child
subreaper, and, when it does not share them, with its parent's cwd and umask.  Any other
sharing is refused at dump (and an image that claims it, at restore).
"""

from __future__ import annotations

from hpccr.errors import UnsupportedResource

FILES, FS = "files", "fs"
CLONE_FS, CLONE_FILES = 0x200, 0x400
FLAGS = {FILES: CLONE_FILES, FS: CLONE_FS}
NAMES = {FILES: "its descriptor table (CLONE_FILES)", FS: "its cwd and umask (CLONE_FS)"}


def shares(proc: dict) -> list[str]:
    return proc["shares_with_parent"]


def clone_flags(proc: dict) -> int:
    flags = 0
    for kind in shares(proc):
        flags |= FLAGS[kind]
    return flags


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
    if FILES not in kinds:
        return "not its descriptor table"
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
