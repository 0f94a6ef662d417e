"""Restore one process (all its threads) from an image directory.

The new task gets the saved pid (clone3 set_tid), reopens its descriptors, then execs the static
stub under PTRACE_TRACEME.  From the stub's first stop on, everything is done by system calls
injected into it: the address space is replaced with the saved one, threads are cloned with their
saved tids, signal state and credentials are put back, and the saved registers are loaded.  Until
the final detach the task is killed if anything fails (or if hpccr itself dies: EXITKILL), and the
image is only ever read.  A child that shares pages with its parent since fork is forked by its
parent's stub instead, once the parent's pages are back (engine/forked.py).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import os
import resource
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hpccr import errors, faults, native
from hpccr.engine import (
    cpu,
    creds,
    fds,
    forked,
    gpu,
    locks,
    memory,
    netlock,
    netns,
    posix_timers,
    prctls,
    procfs,
    sched,
    sessions,
    sharing,
    sigio,
    signals,
    sysv,
    threads,
)
from hpccr.engine.fds import inet, procfile
from hpccr.engine.ghosts import GhostFiles, SharedObjects
from hpccr.engine.job import (
    enter_job_namespaces,
    exit_code,
    fork_into_new_pid_namespace,
    forward_signals,
)
from hpccr.engine.lazy import HOLD_OPTIONS, LazyPages
from hpccr.engine.placement import Placer
from hpccr.engine.tracer import (
    ALL_SIGNALS,
    SYSCALL_INT3,
    Injector,
    Thread,
    poke,
    wait_stopped_again,
)
from hpccr.errors import (
    AccessDenied,
    FileMismatch,
    HpccrError,
    ImageCorrupt,
    IncompatibleMachine,
    PidInUse,
    RestoreFailed,
)
from hpccr.image import ImageReader, chain
from hpccr.image.pages import is_pages
from hpccr.image.series import in_use, resolve
from hpccr.spans import intersect
from hpccr.user import User, fs_rights

if TYPE_CHECKING:
    from hpccr.run import Part

PR_SET_MM, PR_SET_MM_MAP = 35, 14
AT_ENTRY = 9
STUB_INJECT_OFFSET = 9
MM_MAP = struct.Struct("<11QQII")  # struct prctl_mm_map
AT_FDCWD = -100
SYS_EXIT = 60  # x86_64: the exit of one thread
EXIT_TIMEOUT_S = 10.0


class Context:
    """What the restore of one process needs along the way."""

    def __init__(self, reader: ImageReader, proc: dict, shared: SharedObjects, trusted: bool,
                 parent_of: dict[int, int]):
        self.reader = reader
        self.proc = proc
        self.shared = shared
        self.parent_of = parent_of  # of the image's processes (chain.page_sources)
        uid, gid = proc["creds"]["uid"], proc["creds"]["gid"]
        self.ghosts = GhostFiles(reader, uid[1], gid[1], trusted)
        # An image only root could have written may hold what the process opened before it
        # dropped privileges (files, a cwd it can no longer reach): those are reopened as root.
        # A user's own image gets nothing its user could not open.
        self.trusted = trusted
        self.fsuid, self.fsgid = uid[1], gid[1]
        self.exe: tuple[int, int] | None = None  # a user's image: the executable checked
        self.cwd = proc["cwd"]  # where it enters, made by _deleted_working_directories
        self.threads: list[int] = []  # as hpccr sees them, once rebuilt
        self.lazy: LazyPages | None = None  # where its memory goes, if it may come lazily

    def owner_rights(self):
        """File-system rights of the process's user in this (root) process, for a while."""
        return fs_rights(self.fsuid, self.fsgid, self.proc["creds"]["groups"])

    def as_owner(self, call, *args, **kwargs):
        """call(*args, **kwargs) with the file-system rights of the process's user (set by the
        caller), retried with root's only for a trusted image."""
        try:
            return call(*args, **kwargs)
        except PermissionError:
            if not self.trusted:
                raise
            return self.as_restorer(call, *args, **kwargs)

    def as_restorer(self, call, *args, **kwargs):
        """call(*args, **kwargs) with the restorer's own (root's) file-system rights, inside
        owner_rights: for what the restorer made itself (SharedObjects), not a user's path."""
        native.syscall("setfsuid", 0)
        native.syscall("setfsgid", 0)
        try:
            return call(*args, **kwargs)
        finally:
            native.syscall("setfsgid", self.fsgid)
            native.syscall("setfsuid", self.fsuid)


def load(directory: str, slot: int | None = None) -> tuple[ImageReader, dict]:
    reader = ImageReader(resolve(directory, slot))
    reader.verify(deferred=is_pages)  # their pages: hashed as they are written (_bring_back)
    meta = reader.meta()
    reader.parents = chain.open_parents(reader, deferred=is_pages)
    return reader, meta


@dataclass
class Task:
    """One process of the image on its way back."""

    ctx: Context
    children: list[Task] = field(default_factory=list)
    # Sessions whose leader exited: sid -> the processes a helper task creates in it
    helpers: dict[int, list[Task]] = field(default_factory=dict)
    # Children that share its descriptor table (engine/sharing.py): cloned in its stub
    sharers: list[Task] = field(default_factory=list)
    outer: int = 0  # its pid as hpccr sees it, once it exists
    in_outside_group: bool = False  # joins the restorer's group (engine/sessions.py)
    group: int = 0  # the process group it joins when it is created (set by spawn())
    makes_group: int = 0  # a group whose leader exited, which its helper makes (sessions.py)
    group_lifetime: int = -1  # that helper's end of a pipe every task holds until it is built
    group_spare: int = 0  # in a job's pid namespace: a pid no task needs, for its helper's parent
    # Forked by its parent's stub once the parent's pages are back, to share them again
    # (engine/forked.py); until then its donor, a task with a spare pid forked by the nearest
    # ancestor not so forked, holds its descriptors.
    carried: bool = False
    donor: int = 0  # the first pid its donor tries, then the one it has
    donor_outer: int = 0
    parents_scratch: int = 0  # where its copy of its parent's injection area lies

    @property
    def all_children(self) -> list[Task]:
        return self.children + [m for members in self.helpers.values() for m in members]

    @property
    def carried_tree(self) -> list[Task]:
        """A carried task and its descendants (all carried), parents first."""
        return [self, *(t for child in self.children for t in child.carried_tree)]

    @property
    def proc(self) -> dict:
        return self.ctx.proc

    @property
    def zombie(self) -> bool:
        return self.proc.get("exit_status") is not None

    @property
    def sharer(self) -> bool:
        """Made by its parent's stub (engine/sharing.py), not forked."""
        return sharing.injected(self.proc)


def plan(reader: ImageReader, meta: dict, trusted: bool) -> list[Task]:
    """The tasks in creation order (every parent before its children), the root first."""
    shared, parent_of = SharedObjects(reader), parent_processes(meta)
    tasks = {p["pid"]: Task(Context(reader, p, shared, trusted, parent_of))
             for p in meta["processes"]}
    root = tasks.get(meta["root_pid"])
    if root is None:
        raise ImageCorrupt(f"image.json: root process {meta['root_pid']} is not in the image")
    for pid, task in tasks.items():
        if task is not root:
            parent = tasks.get(task.proc["ppid"])
            if parent is None:
                raise ImageCorrupt(f"image.json: the parent {task.proc['ppid']} of process "
                                   f"{pid} is not in the image")
            parent.children.append(task)
    groups = sessions.plan({pid: task.proc for pid, task in tasks.items()}, meta["root_pid"],
                           meta["pidns"])
    for sid, (parent_pid, members) in groups.helpers.items():
        parent = tasks[parent_pid]
        for pid in members:
            parent.children.remove(tasks[pid])
        parent.helpers[sid] = [tasks[pid] for pid in members]
    for pid in groups.in_outside_group:
        tasks[pid].in_outside_group = True
    sharing.check(meta["processes"])
    for task in tasks.values():
        if task.sharer:
            parent = tasks[task.proc["ppid"]]
            parent.children.remove(task)
            parent.sharers.append(task)
    order, stack = [], [root]
    while stack:
        task = stack.pop()
        order += [task, *task.sharers]
        stack.extend(reversed(sorted(task.all_children, key=lambda t: t.proc["pid"])))
    if len(order) != len(tasks):
        raise ImageCorrupt("image.json: the processes do not form one tree")
    for pgid, members in groups.leaderless.items():
        next(t for t in order if t.proc["pid"] in members).makes_group = pgid
    _plan_carried(order, tasks, meta["processes"], reader)
    return order


def _plan_carried(order: list[Task], tasks: dict[int, Task], procs: list[dict],
                  reader: ImageReader) -> None:
    """Which children their parent's stub forks (engine/forked.py): those that share pages
    with it, if their parent's fork can make them and all their descendants; and every child of
    a task so forked."""
    can, subtree = set(), {}
    for task in reversed(order[1:]):  # children before their parents
        pid, parent = task.proc["pid"], tasks[task.proc["ppid"]]
        subtree[pid] = {pid}.union(*(subtree[c.proc["pid"]] for c in task.children))
        if (task in parent.children and not task.makes_group and not task.helpers
                and not task.sharers and all(c.proc["pid"] in can for c in task.children)
                and forked.may_fork(task.proc, parent.proc, procs, subtree[pid])):
            can.add(pid)
    for task in order[1:]:
        pid, parent = task.proc["pid"], tasks[task.proc["ppid"]]
        task.carried = pid in can and (parent.carried or forked.shares_pages(pid, reader))


def restore(directory: str, detach: bool = False, pidfile: str | None = None,
            user: User | None = None) -> int:
    """Restore the image; returns the restored root process's exit status (0 with `detach`)."""
    root = restore_tree(directory, user)
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{root}\n")
    if detach:
        return 0
    return wait_for(root)


def restore_tree(directory: str, user: User | None = None, tcp_close: bool = False,
                 part: Part | None = None,
                 lazy: LazyPages | None = None) -> tuple[int, netns.JobNetwork | None]:
    """Restore the image and let it run; returns the restored root's pid (our child), and the
    network made for it (the job's own; None if it has ours), to be removed when it ends.

    The processes may have the credentials of the image's owner and no more — of `user`'s when
    root restores for a user — and anything for an image only root could have written.
    With `tcp_close`, a TCP connection whose local address does not exist here comes back
    reset instead of failing the restore (fds/inet.py).  A `part` of a job on several nodes
    restores its slot's image of a checkpoint of all parts, and joins the job's overlay through
    the addresses of the job's new nodes.  An image of a series is read with the series in use
    (series.in_use): no checkpoint into it meanwhile.  With `lazy`, the memory lazy.py can
    place after the job runs is left to it (its finish() does that), and the processes that
    have such memory are left traced (lazy.tids)."""
    with in_use(directory, exclusive=False):
        return _restore_tree(directory, user, tcp_close, part.nodes if part else None,
                             part.slot if part else None, lazy)


def _restore_tree(directory: str, user: User | None, tcp_close: bool, nodes: list[str] | None,
                  slot: int | None, lazy: LazyPages | None) -> tuple[int, netns.JobNetwork | None]:
    with _step("reading the image"):
        if user is None:
            reader, meta = load(directory, slot)
        else:
            with user.reading_as_user():
                reader, meta = load(directory, slot)
        st = reader.stat()
    if user is None and st.st_uid != 0:
        user = User.owner_of(st)
    network = None
    try:
        order = plan(reader, meta, trusted=user is None)
        if lazy is not None and "gpu" not in meta:
            _allow_lazy(order, lazy)
        pidns = meta.get("pidns", False)
        spec = _network_spec(meta, pidns)
        with _step("checking the image against this machine"):
            preflight(reader, meta, order, pidns, user)
            gpus = (gpu.Placement(meta["gpu"], {task.proc["pid"] for task in order})
                    if "gpu" in meta else None)
        with _step("making the job's network"):
            network = (netns.JobNetwork(spec, isolated_if_taken=True, down=True, nodes=nodes)
                       if spec else None)
        # Inside the job's network: its sockets are made there, and its first process forked.
        with network.entered() if network else contextlib.nullcontext():
            _bring_back(order, meta, pidns, tcp_close, network, lazy)
        if gpus is not None:
            with _step("giving the GPU processes their GPU state back"):
                try:
                    gpus.resume({task.proc["pid"]: task.outer for task in order})
                except BaseException:
                    _kill_half_restored(order)  # locked by the driver, they would wait forever
                    raise
    except BaseException as exc:
        if network is not None:
            network.remove()
        if isinstance(exc, UNUSABLE_VALUE):  # what the schema lets through, the use refuses
            raise ImageCorrupt(f"image.json holds a value hpccr cannot use ({exc}) "
                               "(image corrupted)") from exc
        raise
    return order[0].outer, network


# Errors from values of the right type but unusable (out of range, lists of another length,
# data shorter than it says) met while an image is used: an image is untrusted input.
UNUSABLE_VALUE = (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error,
                  AttributeError)


def _network_spec(meta: dict, pidns: bool) -> netns.Spec | None:
    if meta["network"] is None:
        return None
    if not pidns:
        raise ImageCorrupt("image.json: a network of its own for a job without its own pids "
                           "(image corrupted)")
    return netns.Spec.from_image(meta["network"])


def _allow_lazy(order: list[Task], lazy: LazyPages) -> None:
    """Let the memory of the processes lazy.py can hold come lazily: not of those forked by
    their parent's stub or forking children so (forked.py: the pages first), nor of those
    stopped (release_all() waits for them to stop again, untraced) or made by their parent's
    stub (sharing.py)."""
    for task in order:
        if not (task.zombie or task.sharer or task.carried or task.proc["stopped"]
                or any(child.carried for child in task.children)
                or any(sharer.proc["stopped"] for sharer in task.sharers)):
            task.ctx.lazy = lazy


def _bring_back(order: list[Task], meta: dict, pidns: bool, tcp_close: bool,
                network: netns.JobNetwork | None, lazy: LazyPages | None) -> None:
    """Create the tasks, rebuild them and let them run; or leave nothing behind."""
    pool = fds.Pool([(task.ctx, task.proc["fds"]) for task in order], tcp_close)
    try:
        with _step("making the deleted working directories again"):
            _deleted_working_directories(order)
        with _step("opening the descriptors"):
            pool.open_all(in_job=not pidns)
        with _step("creating the processes"):
            spawn(order, pidns, pool, meta["sysv"], network)
        pool.close()
        faults.point("spawned")
        try:
            for task in order:
                if not task.sharer and not task.carried:
                    with _step(f"process {task.proc['pid']}: taking over its new task"):
                        take_over(task.outer)
            for task in order:
                for sharer in task.sharers:
                    with _step(f"process {sharer.proc['pid']}: creating it in its parent"):
                        sharer.outer = _clone_sharer(task.outer, sharer.proc)
            for task in order:
                if task.zombie:
                    with _step(f"process {task.proc['pid']}: ending it as a zombie"):
                        _become_zombie(task)
            for task in order:
                if task.zombie or task.sharer or task.carried:
                    continue  # a carried task is rebuilt with its parent
                memory_sharers = [t for t in task.sharers if sharing.shares_memory(t.proc)]
                for sharer in task.sharers:
                    if sharer not in memory_sharers:
                        rebuild(sharer, meta)
                if task.sharers:
                    with _step(f"process {task.proc['pid']}: rebuilding it"):
                        _discard_sigchld(task.outer)
                rebuild(task, meta, memory_sharers)
            with _step("checking the pages no process needed"):
                reader = order[0].ctx.reader
                for image in (reader, *reader.parents):
                    # the others were checked as they were written, or will be as streamed
                    image.verify_deferred(but=lazy.files(image) if lazy else set())
            with _step("removing the files that were deleted"):
                order[0].ctx.shared.unlink_all()  # deleted files are deleted before anything runs
                for task in order:
                    task.ctx.ghosts.unlink_all()
            with _step("sealing memfds and ending TCP repair"):
                pool.add_late_seals()
                pool.end_repair()
            if network is not None:
                with _step("bringing the job's network up"):
                    network.up()  # its connections are back: a peer's packet finds them
            held = set()
            if lazy is not None:  # with the processes that share their memory
                held = {pid for task in order if task.outer in lazy.pids
                        for pid in (task.outer, *(sharer.outer for sharer in task.sharers
                                                  if sharing.shares_memory(sharer.proc)))}
                lazy.tids = [tid for task in order if task.outer in held
                             for tid in task.ctx.threads]
            with _step("letting the processes run"):
                release_all([task for task in order if not task.zombie], held)
        except BaseException:
            _kill_half_restored(order)
            raise
    finally:
        pool.close(late=True)
        order[0].ctx.shared.unlink_all()
        for task in order:
            task.ctx.ghosts.unlink_all()
    for lock in inet.locks_of(e for task in order for e in task.proc.get("fds", [])):
        netlock.unlock(lock)  # the connections are back: the network may move them again


def _deleted_working_directories(order: list[Task]) -> None:
    """A process whose working directory was deleted while it ran (`rm -r` of its run
    directory) gets an empty one again, removed before it runs, as its was: nothing can be
    created in it, as in the old one (the name in /proc/PID/cwd is another)."""
    for task in order:
        if not task.zombie and task.proc["cwd"].endswith(procfs.DELETED):
            with task.ctx.owner_rights():  # as the process's deleted files are made
                task.ctx.cwd = task.ctx.ghosts.directory()


@contextlib.contextmanager
def _step(what: str):
    """An OSError met while doing `what` fails the restore with a message that names it, and
    with exit code 19 (RestoreFailed) if its errno has no error class of its own; so does
    hpccr's own memory running out (MemoryError)."""
    try:
        yield
    except OSError as exc:
        raise errors.from_oserror(exc, f"restore: {what}", RestoreFailed) from exc
    except MemoryError:
        raise RestoreFailed(f"restore: {what}: {errors.OWN_MEMORY}") from None


def _memlock_limit(proc: dict) -> int:
    """What a user's process may lock: its saved RLIMIT_MEMLOCK, within the hard limit here."""
    saved = proc["rlimits"].get("RLIMIT_MEMLOCK", [0, 0])[0]
    here = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    limits = [v for v in (saved, here) if v not in (-1, resource.RLIM_INFINITY)]
    return min(limits) if limits else 1 << 62


def preflight(reader: ImageReader, meta: dict, order: list[Task], pidns: bool,
              user: User | None) -> None:
    """Everything that can be checked before a task exists."""
    if os.geteuid() != 0:
        raise AccessDenied("restoring exact pids needs root (CAP_CHECKPOINT_RESTORE)")
    image_ids = {p["pid"] for p in meta["processes"]}
    image_ids |= {t["tid"] for p in meta["processes"] for t in p["threads"]}
    for task in order:
        proc = task.proc
        excess = user.excess(proc["creds"]) if user is not None else None
        if excess:
            raise AccessDenied(f"process {proc['pid']} of the image has {excess}, which "
                               f"user {user.name} does not: refused")
        if user is not None and proc["exe"] and _deleted_executable(proc) is None:
            task.ctx.exe = user.check_executable(proc["pid"], proc["exe"])
        for tid in _task_pids(task) if not pidns else []:
            if os.path.exists(procfs.path(tid)):
                try:
                    who = procfs.comm(tid)
                except OSError:
                    who = "?"
                raise PidInUse(f"pid {tid} is in use (by '{who}'); the image needs it free")
        for v in proc["vmas"]:
            f = v["file"]
            if v["kind"] != "file" or f is None or f["ghost"]:
                continue  # no file, or one whose checkpointed content is put back
            try:
                st = os.stat(v["path"])
            except OSError:
                raise FileMismatch(f"mapped file {v['path']} is missing") from None
            if st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]:
                raise FileMismatch(f"mapped file {v['path']} changed since the checkpoint")
        fds.check_fds(proc["fds"], None)
        procfile.check_pids(proc, image_ids)
        sched.check(proc, trusted=user is None)
        if not task.zombie and chain.has_pages(reader, proc):
            # Every page found in its image, the images it leaves pages to, or its parent's.
            for pages, _ in chain.page_sources(reader, reader.parents, proc["pid"],
                                               task.ctx.parent_of):
                pages.close()


def parent_processes(meta: dict) -> dict[int, int]:
    """pid -> the pid of its parent, for every process of the image whose parent is in it."""
    pids = {p["pid"] for p in meta["processes"]}
    return {p["pid"]: p["ppid"] for p in meta["processes"] if p["ppid"] in pids}


def spawn(order: list[Task], pidns: bool, pool: fds.Pool, sysv_state: dict | None,
          network: netns.JobNetwork | None = None) -> None:
    """Create every task with its saved pid, parents first, each with its descriptors, cwd,
    session and group; every task ends waiting in the stub.  With `pidns` the tree gets a new
    pid namespace (and mount and IPC namespaces, the latter with the saved SysV objects) with
    its root as pid 1; and `network`, if the job had its own."""
    root = order[0]
    restorer_pgid = 0 if pidns else os.getpgid(0)  # the outside group is 0 in the job's pidns
    for task in order:
        task.group = restorer_pgid if task.in_outside_group else task.proc["pgid"]
    lifetimes = []  # the pipes that keep the helpers of leaderless groups (install_fds closes)
    makers = [task for task in order if task.makes_group]
    # In a pid namespace any other pid may be one a task is about to be created with.
    spare = max(pid for task in order for pid in _task_pids(task)) + 1
    for task in makers:
        if pidns:
            task.group_spare, spare = spare, spare + 1
        ends = os.pipe2(os.O_CLOEXEC)
        lifetimes += [fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, pool.base) for end in ends]
        for end in ends:
            os.close(end)
        task.group_lifetime = lifetimes[-2]
    taken = {pid for task in order for pid in (*_task_pids(task), task.group_spare)}
    for task in order:
        if task.carried:
            task.donor = forked.donor_pids(spare, taken, in_use_now=not pidns)
            spare = task.donor + forked.DONOR_PIDS
    rd, wr = os.pipe2(os.O_CLOEXEC)
    restorer = os.getpid()
    try:
        if network:
            pid = network.fork_inside(
                lambda: fork_into_new_pid_namespace(lambda: native.fork_with_pid(1)))
        elif pidns:
            pid = fork_into_new_pid_namespace(lambda: native.fork_with_pid(1))
        else:
            pid = native.fork_with_pid(root.proc["pid"])
    except OSError as exc:
        for fd in (rd, wr, *lifetimes):
            os.close(fd)
        raise _fork_error(exc, root.proc["pid"]) from None
    if pid == 0:
        _child(root, pool, wr, enter_namespaces=pidns, sysv_state=sysv_state,
               network=network.spec if network else None, parent=0 if pidns else restorer)
    for end in lifetimes:
        os.close(end)  # the tasks hold them until they are built
    root.outer = pid
    os.close(wr)
    with os.fdopen(rd, "rb") as pipe:  # EOF once every task has exec'd the stub (or died)
        error = pipe.read().decode(errors="replace")
    if error:
        _kill_half_restored(order)
        raise _task_error(error)
    _find_outer_pids(order)


def _task_error(report: str) -> HpccrError:
    """The error of the first new task that failed: it wrote "<error class>\t<message>"."""
    error, message = errors.from_report(report)
    return error or RestoreFailed(f"preparing the new tasks failed: {message}")


def _fork(pid: int, flags: int = 0) -> int:
    try:
        return native.fork_with_pid(pid, flags)
    except OSError as exc:
        raise _fork_error(exc, pid) from None


def _task_pids(task: Task) -> list[int]:
    """Every pid and tid the task, its threads and its helpers are created with."""
    return [task.proc["pid"], *task.helpers, *([task.makes_group] if task.makes_group else []),
            *(t["tid"] for t in task.proc["threads"])]


def _make_leaderless_group(pgid: int, lifetime: int, spare: int) -> None:
    """In the first task of group `pgid`, whose leader exited: a helper with the leader's pid
    makes the group, and keeps it until every task holding the write end of the `lifetime` pipe
    has been built (install_fds closes it).  The helper is the child of a child (with pid
    `spare` if not 0) that exits at once: an orphan from the start, reaped as orphans are (by the
    job's init, or a child subreaper of the tree), never a child of the task that made it."""
    ready_rd, ready_wr = os.pipe()
    middle = _fork(spare) if spare else os.fork()
    if middle == 0:
        try:
            if _fork(pgid) == 0:
                os.setpgid(0, 0)
                os.write(ready_wr, b"!")
                os.closerange(0, lifetime)
                os.closerange(lifetime + 1, os.sysconf("SC_OPEN_MAX"))
                os.read(lifetime, 1)  # end of file: every task is built
        finally:
            os._exit(0)
    os.close(ready_wr)
    os.waitpid(middle, 0)
    made = os.read(ready_rd, 1)
    os.close(ready_rd)
    if made != b"!":
        raise RestoreFailed(f"cannot make process group {pgid} (its leader exited) again")


def _fork_task(task: Task, pool: fds.Pool, errpipe: int, watch_parent: bool = True) -> None:
    """Create `task` as a child of this one (it never returns in the child), dying with it if
    `watch_parent`; or, for a task its parent's stub makes, the donors of it and its descendants
    (engine/forked.py)."""
    if not task.carried:
        forker = os.getpid()
        if _fork(task.proc["pid"], sharing.fork_flags(task.proc)) == 0:
            _child(task, pool, errpipe, parent=forker if watch_parent else None)
        return
    for carried in task.carried_tree:
        _fork_donor(carried, pool, errpipe)


def _fork_donor(task: Task, pool: fds.Pool, errpipe: int) -> None:
    forker = os.getpid()
    for pid in range(task.donor, task.donor + forked.DONOR_PIDS):
        try:
            child = native.fork_with_pid(pid)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue  # taken meanwhile: a task needs none of these
            raise _fork_error(exc, pid) from None
        if child == 0:
            _child(task, pool, errpipe, donor=True, parent=forker)
        return
    raise PidInUse(f"no free pid for the donor of process {task.proc['pid']} from "
                   f"{task.donor}")


def _die_with_parent(parent: int) -> None:
    """First thing in a new task: until hpccr has seized it (and PTRACE_O_EXITKILL takes over)
    it dies with the task that forked it, `parent` (0: in another pid namespace, not checked),
    and so on up to the root, which dies with the restorer (and with it a job's whole pid
    namespace): an hpccr killed then leaves no task behind.  If that parent is gone already, it
    ends at once.  rebuild() gives it its own parent-death signal.  Not for a task whose
    parent's main thread ends before it is rebuilt, nor one forked by a helper."""
    native.syscall("prctl", prctls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent and os.getppid() != parent:
        os._exit(1)


def _fork_error(exc: OSError, pid: int) -> HpccrError:
    if exc.errno == errno.EEXIST:
        return PidInUse(f"pid {pid} is in use")
    if exc.errno == errno.EPERM:
        return AccessDenied("clone3 with set_tid was refused (CAP_CHECKPOINT_RESTORE?)")
    return RestoreFailed(f"cannot create a task with pid {pid}: {exc.strerror}")


def _find_outer_pids(order: list[Task]) -> None:
    """Pids as hpccr sees them: the same as saved, unless the tree has its own namespace."""
    for task in order:
        if task.sharer or task.carried:
            continue  # made later, by its parent's stub
        if not task.outer:
            raise RestoreFailed(f"process {task.proc['pid']} was not created")
        by_inner = {}
        for child in _children(task.outer):
            by_inner[int(procfs.status(child)["NSpid"].split()[-1])] = child
        for child in task.all_children:
            if not child.carried:
                child.outer = by_inner.get(child.proc["pid"], 0)
                continue
            for carried in child.carried_tree:  # their donors are this task's children
                carried.donor = next((inner for inner in by_inner if carried.donor <= inner
                                      < carried.donor + forked.DONOR_PIDS), 0)
                carried.donor_outer = by_inner.get(carried.donor, 0)
                if not carried.donor_outer:
                    raise RestoreFailed(f"the donor of process {carried.proc['pid']} was not "
                                        "created")


def _children(pid: int) -> list[int]:
    out = []
    for tid in procfs.tids(pid):
        with open(procfs.path(pid, "task", str(tid), "children")) as f:
            out += [int(c) for c in f.read().split()]
    return out


def _clone_sharer(parent: int, proc: dict) -> int:
    """Create `proc`, which shares its parent's descriptor table (and maybe cwd/umask), by a
    clone3 injected in the parent's stub; returns its pid as hpccr sees it.  It starts traced
    (PTRACE_O_TRACECLONE) and stopped, a copy of the stub, and is rebuilt like the others."""
    native.set_sigmask(parent, ALL_SIGNALS)  # the SIGCHLD its stops raise must not stop it
    leader = Thread(parent)
    leader.capture()
    inj = Injector(parent, leader, data_pages=1, bootstrap_ip=stub_inject_ip(parent))
    try:
        return _clone_in(inj, parent, proc["pid"], sharing.clone_flags(proc))
    finally:
        inj.close(code_ip=stub_inject_ip(parent))


def _clone_in(inj: Injector, parent: int, pid: int, flags: int) -> int:
    """A child of `parent` with pid `pid` and clone `flags`, by a clone3 injected with `inj`;
    returns its pid as hpccr sees it, stopped (auto-attached)."""
    before = set(_children(parent))
    pid_ptr = inj.put(struct.pack("<i", pid))
    args = inj.put(threads.CLONE_ARGS.pack(flags, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, pid_ptr,
                                           1, 0))
    try:
        inner = inj.call("clone3", args, threads.CLONE_ARGS.size)
    except OSError as exc:
        raise _fork_error(exc, pid) from None
    finally:
        inj.reset()
    if inner != pid:
        raise RestoreFailed(f"process {pid} was made with pid {inner}")
    (outer,) = set(_children(parent)) - before
    status = native.wait(outer)  # its initial SIGSTOP, as an auto-attached task
    if not os.WIFSTOPPED(status):
        raise RestoreFailed(f"process {pid} did not start (wait status {status:#x})")
    return outer


def _fork_carried(inj: Injector, parent: int, task: Task, reaper: Injector) -> None:
    """Fork `task` from its parent `parent` (as hpccr sees it), whose pages are back, by `inj`
    (forked.py): it takes its descriptors and cwd from its donor, which then ends, reaped by
    its parent's `reaper`."""
    task.outer = _clone_in(inj, parent, task.proc["pid"], 0)
    task.parents_scratch = inj.base
    thread = Thread(task.outer)
    thread.capture()
    forked.take_from_donor(Injector.adopt(task.outer, thread, inj.base, inj.size), task.proc,
                           task.donor)
    faults.point("carried")
    os.kill(task.donor_outer, signal.SIGKILL)
    reaper.call("wait4", task.donor, 0, 0, 0)
    task.donor_outer = 0


def _discard_sigchld(pid: int) -> None:
    """Take the SIGCHLD the stops of its sharers raised out of the stub `pid` (its own pending
    signals are queued again afterwards, when it is rebuilt)."""
    leader = Thread(pid)
    leader.capture()
    inj = Injector(pid, leader, data_pages=1, bootstrap_ip=stub_inject_ip(pid))
    try:
        _drop_sigchld(inj)
    finally:
        inj.close(code_ip=stub_inject_ip(pid))


def _drop_sigchld(inj: Injector) -> None:
    """Take every pending SIGCHLD out of the task of `inj`."""
    wanted = inj.put(struct.pack("<Q", 1 << (signal.SIGCHLD - 1)))
    no_wait = inj.put(bytes(16))
    with contextlib.suppress(BlockingIOError):  # EAGAIN: none (left)
        while True:
            inj.call("rt_sigtimedwait", wanted, 0, no_wait, 8)
    inj.reset()


def take_over(pid: int) -> None:
    """Seize a task that exec'd the stub (it waits in pause()) and stop it for injection."""
    try:
        # clone and fork events: the threads and the sharers (engine/sharing.py) injected
        # clone3 makes start traced
        native.seize(pid, native.PTRACE_O_EXITKILL | native.PTRACE_O_TRACECLONE
                     | native.PTRACE_O_TRACEFORK)
        native.interrupt(pid)
        status = native.wait(pid)
    except OSError as exc:
        raise RestoreFailed(f"cannot take over the new task {pid}: {exc.strerror}") from None
    if not os.WIFSTOPPED(status):
        raise RestoreFailed(f"the restore stub did not start (wait status {status:#x})")


def stub_inject_ip(pid: int) -> int:
    """The stub's `syscall; int3` pair: 9 bytes after its entry point (see stub.S)."""
    auxv = procfs.auxv(pid)
    entry = dict(struct.iter_unpack("<QQ", auxv)).get(AT_ENTRY)
    ip = entry + STUB_INJECT_OFFSET if entry else 0
    if not entry or native.read_mem(pid, ip, 3) != SYSCALL_INT3:
        raise RestoreFailed("the restore stub is not the one this hpccr was built with")
    return ip


def _become_zombie(task: Task) -> None:
    """End the task with its saved wait status while its parent still ignores SIGCHLD (the
    stub's default), so that nothing is delivered twice; its parent reaps it later."""
    status = task.proc["exit_status"]
    regs = native.get_regs(task.outer)
    if os.WIFSIGNALED(status):
        native.detach(task.outer, 0)
        os.kill(task.outer, os.WTERMSIG(status))
        return
    try:
        native.inject(task.outer, stub_inject_ip(task.outer), regs, "exit_group",
                      os.WEXITSTATUS(status))
    except OSError as exc:
        if exc.errno != errno.ESRCH:  # ESRCH: it is gone, as wanted (its exit was waited for)
            raise


def _child(task: Task, pool: fds.Pool, errpipe: int, enter_namespaces: bool = False,
           sysv_state: dict | None = None, network: netns.Spec | None = None,
           donor: bool = False, parent: int | None = None) -> None:
    """Runs in the new task with its saved pid: creates its children, then becomes the stub.
    A `donor` (engine/forked.py) has another pid and no children, stays in the session and
    group of the task that forks it, and holds the task's descriptors and cwd for it.  Until
    hpccr has seized it, it dies with the task that forked it, its `parent` (as it sees it; 0:
    in another pid namespace), unless that is None.  Never returns."""
    proc, ctx = task.proc, task.ctx
    errpipe = fcntl.fcntl(errpipe, fcntl.F_DUPFD_CLOEXEC, pool.base)
    try:
        if parent is not None:
            _die_with_parent(parent)
        if enter_namespaces:
            enter_job_namespaces(network)
            if sysv_state:
                sysv.restore_namespace(sysv_state, task.ctx.reader)
            pool.open_all()  # what must be made inside the job's namespaces
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        # A donor stays in the session and group of the task that forks it.
        if not donor and proc["sid"] == proc["pid"]:
            os.setsid()  # it led its session (and group): it leads a new one
        elif not donor and task.group != os.getpgid(0):
            if task.makes_group:
                _make_leaderless_group(task.makes_group, task.group_lifetime,
                                       task.group_spare)
            os.setpgid(0, task.group)  # its own group, or one its leader (or helper) made
        if not task.zombie and not donor:
            prctls.restore(proc)
        for child in [] if donor else task.children:
            _fork_task(child, pool, errpipe, watch_parent=not proc["main_thread_exited"])
        for sid, members in task.helpers.items():
            helper = _fork(sid)
            if helper == 0:  # the exited session leader, for as long as its session is made
                os.setsid()
                for member in members:
                    _fork_task(member, pool, errpipe, watch_parent=False)
                os._exit(0)
            os.waitpid(helper, 0)  # its members are ours now
        if not task.zombie:
            uid, gid = proc["creds"]["uid"], proc["creds"]["gid"]
            # Open files with the process's own rights, not root's.
            os.setgroups(proc["creds"]["groups"])
            native.syscall("setfsgid", gid[1])
            native.syscall("setfsuid", uid[1])
            ctx.as_owner(os.chdir, ctx.cwd)
            fds.install_fds(proc["fds"], ctx, pool, errpipe)
            if donor:
                forked.hold_cwd(proc)
            native.syscall("setfsuid", 0)
            native.syscall("setfsgid", 0)
            os.umask(proc["umask"])
            native.syscall("personality", proc["personality"])
        else:
            fds.install_fds([], ctx, pool, errpipe)
        os.execve(native.stub_path(), ["hpccr-stub"], {})
    except BaseException as exc:  # report, whatever it was, then die
        msg = exc.strerror if isinstance(exc, OSError) and exc.filename is None else str(exc)
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.filename}: {exc.strerror}"
        kind = type(exc).__name__ if isinstance(exc, HpccrError) else ""
        try:
            os.write(errpipe, f"{kind}\tprocess {proc['pid']}: {msg or repr(exc)}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(127)


def rebuild(task: Task, meta: dict, memory_sharers: list[Task] = ()) -> None:
    """Turn the stub task of `task` into the saved process, leaving all its threads stopped:
    release_all() lets them go once every process of the tree is ready.  Its `memory_sharers`,
    children made with its address space (sharing.py), are rebuilt with it; so are the children
    its stub forks once its pages are back (forked.py), their children forked from theirs in
    turn: every address space first, then the rest.  The donors of them all are its children,
    reaped by its stub."""
    tree = [task, *(t for child in task.children if child.carried for t in child.carried_tree)]
    started: list[tuple[Thread, Injector]] = []
    for member in tree:
        with _step(f"process {member.proc['pid']}: rebuilding it"):
            started.append(_rebuild_memory(member, meta, started[0][1] if started else None))
    for member, (stub, inj) in zip(tree, started, strict=True):
        with _step(f"process {member.proc['pid']}: rebuilding it"):
            _rebuild_rest(member, meta, stub, inj, memory_sharers if member is task else ())


def _rebuild_memory(task: Task, meta: dict, reaper: Injector | None) -> tuple[Thread, Injector]:
    """The first part of rebuild(): its address space, its carried children forked from it
    (their donors reaped by `reaper`, else by its own stub).  Returns its stub's main thread and
    the injector that goes on."""
    proc, pid = task.proc, task.outer
    stub = Thread(pid)
    stub.capture()
    native.set_sigmask(pid, ALL_SIGNALS)
    here = native.get_xstate(pid)
    missing = meta["cpu"]["xfeatures"] & ~cpu.xfeatures(here)
    if missing or meta["cpu"]["xstate_size"] != len(here):
        raise IncompatibleMachine(
            f"the image needs CPU state features {meta['cpu']['xfeatures']:#x} "
            f"(size {meta['cpu']['xstate_size']}); this machine has {cpu.xfeatures(here):#x} "
            f"(size {len(here)})")
    occupied = [(v["start"], v["end"]) for v in proc["vmas"]]
    occupied += [(e.start, e.end) for e in procfs.maps(pid)]
    scratch_at = memory.find_free(occupied, Injector.CODE_SIZE + 15 * native.PAGE_SIZE)
    inj = Injector(pid, stub, at=scratch_at,
                   bootstrap_ip=task.parents_scratch or stub_inject_ip(pid))
    occupied.append((inj.base, inj.base + inj.size))

    if task.parents_scratch:
        spans = chain.forked_spans(task.ctx.reader, proc["pid"])
        specials, kept = forked.clear(inj, pid, proc["vmas"], task.parents_scratch, spans)
        shared = intersect(spans, kept)
    else:
        specials, kept, shared = memory.clear_stub(inj, pid), [], []
    memory.move_specials(inj, specials, proc["vmas"], occupied)
    _restore_address_space(task.ctx, inj, pid, kept, shared,
                           [child for child in task.children if child.carried], reaper or inj)
    return stub, inj


def _rebuild_rest(task: Task, meta: dict, stub: Thread, inj: Injector,
                  memory_sharers: list[Task]) -> None:
    """The rest of rebuild(), by the injector that rebuilt its memory."""
    ctx, proc, pid = task.ctx, task.proc, task.outer
    if any(child.carried for child in task.children):
        _drop_sigchld(inj)  # raised by its new children's stops, its donors' ends
    sysv.remove_attached(inj, proc["vmas"], meta["sysv"])
    threads.restore_xcomp_perm(inj, proc["threads"][0]["xcomp_perm"])
    signals.restore_sigactions(inj, proc["sigactions"])
    locks.take_posix(inj, proc["fds"])  # after the files mapped were opened and closed

    exited = proc["main_thread_exited"]  # the stub is the main thread only until the end
    if exited:
        threads.set_name(inj, stub, proc["comm"])  # the process's name is its main thread's
    tasks = [] if exited else [(stub, proc["threads"][0])]
    for saved in proc["threads"][len(tasks):]:
        t = Thread(threads.create_thread(inj, saved["tid"]))
        t.capture()
        tasks.append((t, saved))
    procfile.open_late(inj, proc)  # its threads exist: /proc/TID names them
    fds.set_cloexec(inj, proc["fds"])
    for thread, saved in tasks:
        threads.restore_thread(inj, thread, saved)
        signals.restore_altstack(inj, thread, saved["sigaltstack"])
        sched.restore(thread.tid, saved["sched"])
    signals.restore_itimers(inj, proc["itimers"])
    posix_timers.restore_timers(inj, proc["posix_timers"])
    signals.queue_pending(inj, proc["pid"], proc["shared_pending"])
    for thread, saved in tasks:
        signals.queue_pending(inj, proc["pid"], saved["pending"], thread, saved["tid"])
    sharers = [(sharer, *_rebuild_memory_sharer(inj, sharer)) for sharer in memory_sharers]
    creds.restore_rlimits(pid, proc["rlimits"], ctx.trusted)
    # The injection page must go before credentials drop: munmap needs no privilege, but the
    # page must not outlive the restore.  Credentials come last, thread by thread.
    for thread, _ in tasks[0 if exited else 1:]:
        creds.restore_creds(inj, thread, proc["creds"])
    creds.restore_creds(inj, stub, proc["creds"])
    sigio.restore(inj, proc["fds"])  # with the process's own credentials, see sigio.py
    # Its own parent-death signal (none: the root's watch on the restorer, see _child, goes),
    # again after its credentials, whose change clears it.
    inj.call("prctl", prctls.PR_SET_PDEATHSIG, proc["pdeathsig"])
    xstates = [ctx.reader.read_bytes(saved["xstate"]) for _, saved in tasks]
    for (thread, _), xstate in zip(tasks, xstates, strict=True):
        if cpu.uses_amx_tiles(xstate):
            threads.touch_amx(inj, thread)
    inj.close(code_ip=proc["threads"][0]["regs"]["rip"])
    if exited:
        _end_main_thread(pid, stub, proc["threads"][0]["regs"]["rip"], tasks[0][0].tid)
    for (thread, saved), xstate in zip(tasks, xstates, strict=True):
        _load_cpu(thread, saved, xstate)
    for thread, saved in tasks:
        native.set_sigmask(thread.tid, saved["sigmask"])
    ctx.threads = [thread.tid for thread, _ in tasks]
    for sharer, thread, saved in sharers:
        _load_cpu(thread, saved, sharer.ctx.reader.read_bytes(saved["xstate"]))
        native.set_sigmask(thread.tid, saved["sigmask"])
        sharer.ctx.threads = [thread.tid]


def _end_main_thread(pid: int, stub: Thread, code_ip: int, thread: int) -> None:
    """End the stub, the main thread of a process whose main thread had exited, by the exit
    path of a thread (exit, not exit_group), the other threads still stopped: it becomes the
    zombie leader the process had.  It runs a `syscall` poked at `code_ip` (through the memory
    of `thread`, one of the others: a zombie leader has none), untraced (a traced leader's exit
    could not be waited for while its threads live)."""
    original = poke(thread, code_ip, SYSCALL_INT3)
    try:
        regs = native.new_regs()
        native.ffi.memmove(regs, stub.regs, native.ffi.sizeof("struct user_regs_struct"))
        regs.rip, regs.rax, regs.rdi, regs.orig_rax = code_ip, SYS_EXIT, 0, (1 << 64) - 1
        native.set_regs(pid, regs)
        native.detach(pid, 0)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while procfs.state(pid) != "Z":
            if time.monotonic() > deadline:
                raise RestoreFailed(f"the main thread of process {pid} did not exit")
            time.sleep(0.0005)
    finally:
        poke(thread, code_ip, original)


def _rebuild_memory_sharer(inj: Injector, sharer: Task) -> tuple[Thread, dict]:
    """A process whose address space is its parent's, by its parent's injector once that memory
    is back (rseq and robust lists point into it): its one thread like a thread of the parent,
    then what its own process holds (signal handlers unless shared, itimers, pending signals,
    rlimits, credentials last).  Its registers are loaded with the parent's."""
    proc, saved = sharer.proc, sharer.proc["threads"][0]
    thread = Thread(sharer.outer)
    thread.capture()
    native.set_sigmask(thread.tid, ALL_SIGNALS)
    threads.restore_thread(inj, thread, saved)
    signals.restore_altstack(inj, thread, saved["sigaltstack"])
    sched.restore(thread.tid, saved["sched"])
    if sharing.SIGHAND not in sharing.shares(proc):
        signals.restore_sigactions(inj, proc["sigactions"], thread)
    signals.restore_itimers(inj, proc["itimers"], thread)
    signals.queue_pending(inj, proc["pid"], proc["shared_pending"], thread, proc["pid"])
    signals.queue_pending(inj, proc["pid"], saved["pending"], thread, saved["tid"])
    creds.restore_rlimits(sharer.outer, proc["rlimits"], sharer.ctx.trusted)
    creds.restore_creds(inj, thread, proc["creds"])
    return thread, saved


def release_all(tasks: list[Task], held: set[int] = frozenset()) -> None:
    """Detach every thread of the rebuilt processes: each runs on from where it was saved, or
    stops again at once if it was stopped.  First none of them dies with hpccr any more
    (PTRACE_O_EXITKILL cleared): an hpccr killed from then on lets them all run, as a detach
    would (a tracer's exit detaches its tracees), never some of them.  But those `held`
    (lazy.py, none stopped) run on traced, and die with hpccr until lazy.py lets them go."""
    for task in tasks:
        if task.proc["stopped"]:
            os.kill(task.outer, signal.SIGSTOP)  # pending: they stop as soon as they run
        for tid in task.ctx.threads:
            native.set_options(tid, HOLD_OPTIONS if task.outer in held else 0)
    # Stopped processes first: the others must not see one before it stops again.
    for task in sorted(reversed(tasks), key=lambda t: not t.proc["stopped"]):
        for tid in reversed(task.ctx.threads):
            (native.cont if task.outer in held else native.detach)(tid, 0)
        faults.point("release")
        if task.proc["stopped"]:
            wait_stopped_again(task.outer, task.ctx.threads)


def _restore_address_space(ctx: Context, inj: Injector, pid: int,
                           kept: list[tuple[int, int]], shared: list[tuple[int, int]],
                           carried: list[Task], reaper: Injector) -> None:
    """Map the saved VMAs (but those `kept` of its parent's, forked.py, whose pages it `shared`
    stay), write the pages, fork the `carried` children (their donors reaped by `reaper`), then
    set protections, madvise state and the memory layout."""
    proc = ctx.proc
    cr = proc["creds"]
    ghost = _deleted_executable(proc)
    exe = ctx.ghosts.executable(ghost) if ghost else proc["exe"]
    exe_fd = _open_in_target(inj, exe, os.O_RDONLY)  # as root: only a link is set
    if ctx.exe is not None:  # a user's image: the file preflight checked, or none
        st = os.stat(procfs.path(pid, "fd", str(exe_fd)))
        if (st.st_dev, st.st_ino) != ctx.exe:
            raise AccessDenied(f"{proc['exe']} was replaced after it was checked: refused")
    groups = cr["groups"]
    inj.call("setgroups", len(groups), inj.put(struct.pack(f"{len(groups)}I", *groups)))
    inj.call("setfsgid", cr["gid"][1])
    inj.call("setfsuid", cr["uid"][1])
    opened: dict[tuple[str, int], int] = {}

    def as_root(path: str, flags: int) -> int:
        inj.call("setfsuid", 0)
        inj.call("setfsgid", 0)
        try:
            return _open_in_target(inj, path, flags)
        finally:
            inj.call("setfsgid", cr["gid"][1])
            inj.call("setfsuid", cr["uid"][1])

    def open_file(vma: dict) -> int:
        path, saved = vma["path"], vma["file"]["ghost"]
        # A shared mapping that may become writable (mprotect) needs a file opened for writing.
        writable = vma["prot"][1] == "w" or vma["may_write"]
        flags = os.O_RDWR if vma["shared"] and writable else os.O_RDONLY
        if vma["kind"] == "shmem":  # the restorer's own object, shared by the whole tree
            key = (ctx.shared.shmem(saved), os.O_RDWR)
            if key not in opened:
                opened[key] = as_root(*key)
            return opened[key]
        if vma["kind"] == "ghost":
            path = ctx.ghosts.path(saved, None)
        elif saved:
            with ctx.owner_rights():
                ctx.as_owner(ctx.shared.put_back, saved, path)
        if (path, flags) not in opened:
            try:
                opened[(path, flags)] = _open_in_target(inj, path, flags)
            except PermissionError:
                if not ctx.trusted:
                    raise AccessDenied(f"cannot open mapped file {vma['path']}: "
                                       "permission denied") from None
                opened[(path, flags)] = as_root(path, flags)
            except OSError as exc:
                raise FileMismatch(f"cannot open mapped file {vma['path']}: "
                                   f"{os.strerror(exc.errno)}") from None
        return opened[(path, flags)]

    in_place = set(kept)
    fresh = [v for v in proc["vmas"] if (v["start"], v["end"]) not in in_place]
    memory.map_vmas(inj, fresh, open_file)
    for fd in opened.values():
        inj.call("close", fd)
    forked.drop_unshared(inj, kept, shared)
    if chain.has_pages(ctx.reader, proc):
        sources = chain.page_sources(ctx.reader, ctx.reader.parents, proc["pid"], ctx.parent_of,
                                     in_place=shared)
        lazy = (ctx.lazy is not None and not any(pages.compressed for pages, _ in sources)
                and Placer.open(inj, fresh, lazy=True))
        if lazy:
            ctx.lazy.add(pid, lazy, sources)  # kept registered: the calls injected next wait
        else:
            placer = Placer.open(inj, fresh)
            try:
                memory.write_pages(pid, sources,
                                   lambda addr, length: inj.call("madvise", addr, length,
                                                                 memory.MADV_POPULATE_WRITE),
                                   placer)
            finally:
                if placer is not None:
                    placer.close()  # unregisters: the calls injected next may touch the memory
    for child in carried:  # before the madvise state (MADV_WIPEONFORK, MADV_DONTFORK)
        with _step(f"process {child.proc['pid']}: forking it from its parent"):
            _fork_carried(inj, pid, child, reaper)
    memory.protect_vmas(inj, fresh)
    forked.protect(inj, proc["vmas"], kept)
    memory.advise_vmas(inj, proc["vmas"], None if ctx.trusted else _memlock_limit(proc))
    mm = proc["mm"]
    auxv = base64.b64decode(mm["auxv"])
    auxv_ptr = inj.put(auxv)
    mm_map = inj.put(MM_MAP.pack(
        mm["start_code"], mm["end_code"], mm["start_data"], mm["end_data"], mm["start_brk"],
        mm["brk"], mm["start_stack"], mm["arg_start"], mm["arg_end"], mm["env_start"],
        mm["env_end"], auxv_ptr, len(auxv), exe_fd))
    try:
        inj.call("prctl", PR_SET_MM, PR_SET_MM_MAP, mm_map, MM_MAP.size, 0)
    except OSError as exc:
        raise RestoreFailed(f"PR_SET_MM_MAP refused the saved memory layout: "
                            f"{os.strerror(exc.errno)}") from None
    inj.call("close", exe_fd)
    inj.call("setfsuid", 0)
    inj.call("setfsgid", 0)
    inj.reset()


def _deleted_executable(proc: dict) -> str | None:
    """The saved copy of a process's executable deleted since it started (a program rebuilt
    while it ran): its mapping's ghost, which the restored process runs again; else None."""
    if not proc["exe"].endswith(procfs.DELETED):
        return None
    path = proc["exe"][:-len(procfs.DELETED)]
    for v in proc["vmas"]:
        if v["kind"] == "ghost" and v["path"] == path and v["file"]:
            return v["file"]["ghost"]
    raise ImageCorrupt(f"process {proc['pid']}: its executable {path} was deleted and the "
                       "image holds no copy of it (image corrupted)")


def _open_in_target(inj: Injector, path: str, flags: int) -> int:
    ptr = inj.put(path.encode() + b"\0")
    try:
        return inj.call("openat", AT_FDCWD, ptr, flags | os.O_CLOEXEC, 0)
    finally:
        inj.reset()


def _load_cpu(thread: Thread, saved: dict, xstate: bytes) -> None:
    try:
        native.set_xstate(thread.tid, xstate)
    except OSError as exc:
        raise IncompatibleMachine(f"thread {saved['tid']}: the saved FPU/vector state was "
                                  f"refused by this CPU ({os.strerror(exc.errno)})") from None
    native.set_regs(thread.tid, native.regs_from_dict(cpu.resume_regs(saved["regs"])))


def _kill_half_restored(order: list[Task]) -> None:
    """Kill every task created so far and reap the root (the others are its descendants, or
    hpccr's tracees: their notifications are consumed too)."""
    for task in order:
        for pid in (task.outer, task.donor_outer):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    root = order[0].outer
    while root:
        try:
            reaped, _ = os.waitpid(-1, native.WALL)
        except ChildProcessError:
            return
        if reaped == root:
            return


def wait_for(pid: int) -> int:
    """Wait for the restored root like its parent would, passing signals on to it."""
    forward_signals(pid)
    try:
        return exit_code(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return 0
