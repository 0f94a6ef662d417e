"""Process trees on the dump side: find every process of a job, freeze them all before anything
is read, and tell which kernel objects (open file descriptions) they share."""

from __future__ import annotations

import errno
import os

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.tracer import FrozenProcess
from hpccr.errors import AccessDenied, NoSuchProcess, UnsupportedResource

SHARED_TABLES = (
    (native.KCMP_VM, "one address space (CLONE_VM or vfork)"),
    (native.KCMP_FILES, "one descriptor table (CLONE_FILES)"),
    (native.KCMP_FS, "one cwd, root and umask (CLONE_FS)"),
    (native.KCMP_SIGHAND, "their signal handlers (CLONE_SIGHAND)"),
)
PARENT_SHARED = ((native.KCMP_FILES, "files"), (native.KCMP_FS, "fs"), (native.KCMP_VM, "vm"),
                 (native.KCMP_SIGHAND, "sighand"))  # as sharing.py names them
NAMESPACES = ("mnt", "net", "uts", "ipc", "user", "cgroup", "time", "time_for_children", "pid",
              "pid_for_children")


def children(pid: int) -> list[int]:
    """Children of every thread of `pid`."""
    out = []
    for tid in procfs.tids(pid):
        try:
            with open(procfs.path(pid, "task", str(tid), "children")) as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue  # that thread exited
    return sorted(out)


def _namespaces(pid: int) -> dict[str, str]:
    """The namespaces of `pid` that a restore would not make again for it, by kind."""
    return {kind: os.readlink(procfs.path(pid, "ns", kind)) for kind in NAMESPACES}


ENDED = ("Z", "X", None)  # zombie, dead, gone


def exit_status(pid: int) -> int:
    """The wait status a zombie's parent will get (proc(5) stat field 52)."""
    return int(procfs.stat(pid)[52])


class FrozenTree:
    """Every process below (and including) `root`, seized and stopped.

    The walk repeats until it finds nothing new: a process is only listed once its parent is
    stopped, so nothing can fork behind the walk's back.  Zombies cannot be traced and need not
    be: they are recorded as they are.  A child may still end while it is being frozen (a job
    running short-lived commands): it is then a zombie of its frozen parent, or gone if its
    parent does not wait for children, and is taken as such."""

    def __init__(self, root: int):
        self.root = root
        self.frozen: dict[int, FrozenProcess] = {}
        self.zombies: list[int] = []
        self.shared_with_parent: dict[int, list[str]] = {}  # pid -> ["files"(, "fs")]

    @property
    def pids(self) -> list[int]:
        """All processes, parents before children, the root first."""
        order, stack = [], [self.root]
        known = set(self.frozen) | set(self.zombies)
        while stack:
            pid = stack.pop()
            order.append(pid)
            if pid in self.frozen:
                stack.extend(reversed([c for c in children(pid) if c in known]))
        return order

    def parent_of(self, pid: int) -> int:
        return int(procfs.status(pid)["PPid"])

    def freeze(self) -> None:
        try:
            pending = [self.root]
            while pending:
                pid = pending.pop()
                if pid in self.frozen or pid in self.zombies:
                    continue
                if pid == self.root:
                    if procfs.state(pid) in ("Z", "X") and not procfs.leader_exited(pid):
                        raise OSError(errno.ESRCH, f"process {pid} is a zombie")
                elif self._ended(pid):
                    continue
                process = FrozenProcess(pid)
                try:
                    process.freeze()
                except (NoSuchProcess, AccessDenied):  # ESRCH, or EPERM: ptrace of a zombie
                    if pid == self.root or not self._ended(pid):
                        raise
                    continue
                self.frozen[pid] = process
                pending += children(pid)
            self._check_namespaces()
            self._find_shared_tables()
        except BaseException:
            self.thaw()
            raise

    def _ended(self, pid: int) -> bool:
        """Has `pid` ended?  A zombie is recorded as one; a process gone altogether (its parent
        does not wait for children) is left out."""
        state = procfs.state(pid)
        if state == "Z" and procfs.leader_exited(pid):
            return False
        if state == "Z":
            self.zombies.append(pid)
        return state in ENDED

    def _check_namespaces(self) -> None:
        """Refuse a process in namespaces other than the root's (unshare, a container started
        inside the job), or chrooted: it would come back in the restorer's namespaces and root,
        silently seeing other files, hosts or ids.  The root's own are the job's, made again
        at restore or taken from wherever it is restored."""
        root = _namespaces(self.frozen[self.root].reader)
        for pid, process in self.frozen.items():
            for kind, ns in _namespaces(process.reader).items():
                if ns != root[kind]:
                    raise UnsupportedResource(
                        f"process {pid} ({procfs.comm(pid)}) is in a {kind.replace('_', ' ')} "
                        f"namespace other than its job's (unshare, a container): not "
                        "supported yet")
            if os.readlink(procfs.path(process.reader, "root")) != "/":
                raise UnsupportedResource(
                    f"process {pid} ({procfs.comm(pid)}) has a root directory of its own "
                    "(chroot): not supported yet")

    def _find_shared_tables(self) -> None:
        """Processes that share an address space, descriptor table, cwd/umask or signal
        handlers (clone without CLONE_THREAD, vfork).  A descriptor table (and cwd/umask)
        shared with the parent is recorded in `shared_with_parent` (engine/sharing.py says
        what of it can be restored); any other sharing is refused, and the tree thawed."""
        pids = list(self.frozen)
        parent = {pid: self.parent_of(pid) for pid in pids}
        reader = {pid: process.reader for pid, process in self.frozen.items()}
        for pid in pids:
            kinds = [name for kind, name in PARENT_SHARED if parent[pid] in self.frozen
                     and native.kcmp(reader[parent[pid]], reader[pid], kind) == 0]
            if kinds:
                self.shared_with_parent[pid] = kinds
        for i, first in enumerate(pids):
            for second in pids[i + 1:]:
                for kind, what in SHARED_TABLES:
                    if native.kcmp(reader[first], reader[second], kind) == 0 \
                            and not self._with_parent(
                            first, second, kind, parent):
                        raise UnsupportedResource(
                            f"processes {first} and {second} share {what}: not supported yet")

    def _with_parent(self, first: int, second: int, kind: int, parent: dict[int, int]) -> bool:
        """Is this sharing one recorded with a parent (the parent and a child, or two
        children of that parent)?"""
        name = dict(PARENT_SHARED).get(kind)
        if name is None:
            return False

        def shares_with(child: int, with_pid: int) -> bool:
            return parent[child] == with_pid and name in self.shared_with_parent.get(child, [])

        return (shares_with(second, first) or shares_with(first, second)
                or (parent[first] == parent[second] and shares_with(first, parent[first])
                    and shares_with(second, parent[second])))

    def thaw(self) -> None:
        """Release every process; those that were stopped first, so that none of the others
        can see one of them between its detach and its stop."""
        for process in sorted(self.frozen.values(), key=lambda p: not p.stopped):
            process.thaw()
        self.frozen.clear()

    def kill(self) -> None:
        """SIGKILL every process, children first: each is reaped by hpccr as its tracer, then
        by its parent (zombies of the tree too), so that none is left over."""
        parents = {pid: self.parent_of(pid) for pid in self.pids}
        for pid in reversed(self.pids):
            if pid in self.frozen:
                self.frozen[pid].kill()
            parent = self.frozen.get(parents[pid])
            if parent is not None and pid != self.root:
                parent.reap(pid)
        self.frozen.clear()


def ns_pid(pid: int) -> int:
    """The pid of `pid` inside its own (innermost) pid namespace."""
    return int(procfs.status(pid)["NSpid"].split()[-1])


def own_pid_namespace(pid: int) -> bool:
    """Is `pid` the init (pid 1) of a pid namespace of its own, as `hpccr run` makes?"""
    return ns_pid(pid) == 1 and os.readlink(procfs.path(pid, "ns", "pid")) != os.readlink(
        procfs.path(os.getpid(), "ns", "pid"))
