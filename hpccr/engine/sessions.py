"""Sessions and process groups of a tree, and how a restore makes them again.

They are rebuilt as they are inherited: a session leader calls setsid() before it creates its
children.  A session whose leader exited is made by a helper task with the leader's pid, which
calls setsid(), creates the session's topmost processes and exits: they are then re-parented to
their real parent, which must be the job's init or a child subreaper, as it was when they were
orphaned.  A group whose leader exited (a pipeline whose first command ended) is made by a
helper with the leader's pid too, forked by the group's first process to be created: it makes
the group, which the members join, and exits once every process of the tree exists; it is an
orphan from the start, reaped as orphans are (by the job's init, or a child subreaper).

The session and group the tree was started in (a shell's, for `./sim &` or `nohup ./sim &`) are
outside it: after a restore they are the restoring process's, the way a shell job's would be.
The processes of that session stay in the restorer's, those of that group join the restorer's
group, and a group led in the tree is made again in the restorer's session.

The dump checks the same plan before it kills anything (exit 14 for a tree it cannot restore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpccr.errors import UnsupportedResource


@dataclass
class Plan:
    # sid of a session whose leader exited -> (the parent of its topmost processes, their pids)
    helpers: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    # processes in the group the tree was started in, led from outside the tree
    in_outside_group: set[int] = field(default_factory=set)
    # pgid of a group whose leader exited (not a session's) -> its processes
    leaderless: dict[int, list[int]] = field(default_factory=dict)


def plan(procs: dict[int, dict], root_pid: int, pidns: bool) -> Plan:
    """How the sessions and groups of `procs` (by pid, the root's parent not among them) are
    made again; raises UnsupportedResource for what cannot be."""
    root = procs[root_pid]
    outside_sid, outside_pgid = root["sid"], root["pgid"]
    result = Plan()
    orphaned: dict[int, list[int]] = {}
    for pid, proc in procs.items():
        sid, pgid = proc["sid"], proc["pgid"]
        if (sid != outside_sid or pid == sid) and sid not in procs:
            parent = procs.get(proc["ppid"])
            if parent is None or parent["sid"] != sid:  # topmost in its session
                orphaned.setdefault(sid, []).append(pid)
        elif sid != outside_sid or pid == sid:
            ancestor = proc
            while ancestor is not None and ancestor["pid"] != sid:
                ancestor = procs.get(ancestor["ppid"])
            if ancestor is None:
                raise UnsupportedResource(
                    f"process {pid} is in session {sid}, whose leader is not one of its "
                    "ancestors in the image: not supported yet")
        if pgid == outside_pgid and pgid not in procs:
            result.in_outside_group.add(pid)
        elif pgid not in procs and pgid != sid:
            result.leaderless.setdefault(pgid, []).append(pid)
    for sid, members in orphaned.items():
        parents = {procs[m]["ppid"] for m in members}
        parent = procs.get(parents.pop()) if len(parents) == 1 else None
        if parent is None or not (parent["child_subreaper"]
                                  or (pidns and parent is root)):
            raise UnsupportedResource(
                f"session {sid}, whose leader exited, has processes {sorted(members)} that are "
                "not all children of one child subreaper or of the job's init: not supported yet")
        result.helpers[sid] = (parent["pid"], sorted(members))
    return result
