"""Dump a process tree (every process below the given one, all their threads) into an image
directory.

Order matters for the "never lose the job" rule: the whole tree is frozen, everything is read
and streamed into a temporary image, and only a committed image allows the processes to be
killed.  Any failure before that thaws them exactly as they were and removes the partial image.

A job started by `hpccr run` is the tree of its pid 1 in a pid namespace of its own: the image
then records the pids as the job sees them, and a restore recreates such a namespace.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import hpccr
from hpccr import config, faults, native
from hpccr.engine import (
    cpu,
    creds,
    fds,
    gpu,
    memory,
    netns,
    parasite,
    posix_timers,
    prctls,
    procfs,
    sched,
    sessions,
    sharing,
    sigio,
    signals,
    snapshot,
    sysv,
    threads,
    tree,
)
from hpccr.engine import tracking as tracking_
from hpccr.engine.ghosts import GhostWriter
from hpccr.engine.tracer import FrozenProcess
from hpccr.engine.tree import FrozenTree
from hpccr.errors import (
    OWN_MEMORY,
    AccessDenied,
    DumpFailed,
    HpccrError,
    NoSuchProcess,
    UnsupportedResource,
    from_oserror,
)
from hpccr.image import ImageReader, ImageWriter, PageReader, PageWriter, chain
from hpccr.image.pages import (
    forked_name,
    inherited_name,
    pack_runs,
    pagemap_name,
    spans_of,
)
from hpccr.spans import size, subtract, union
from hpccr.user import User

MODES = ("kill", "running", "stopped")
# A process with less memory to save is copied inside the freeze even by a running dump: that
# costs less than setting up its snapshot (a few ms), and the short-lived commands of a job
# script would often end before their snapshot is read (the dump then starts over frozen).
SNAPSHOT_MIN_BYTES = 16 << 20
# An incremental checkpoint saving at most this share of the memory its tracker follows copies it
# inside the freeze too: a snapshot there passes over every page table of that memory four times
# (the tracker lets go, the snapshot protects, lets go, the tracker protects again), which costs
# more, frozen, than copying a few scattered pages (bench/README.md has the figures).  Not more
# than INCREMENT_IN_FREEZE_MAX, though: those pages are written to the image inside the freeze,
# at the speed of its file system, which may be a slow one.
INCREMENT_IN_FREEZE_SHARE = 1 / 16
INCREMENT_IN_FREEZE_MAX = 256 << 20
# proc(5) stat fields of the memory layout PR_SET_MM_MAP restores
MM_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
             "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50,
             "env_end": 51}


@dataclass
class DumpResult:
    path: str
    frozen_s: float
    dump_s: float
    pages: int
    gpu_s: float = 0.0  # the driver's time moving GPU state (the job paused, not frozen)


def check_target(pid: int) -> None:
    if pid <= 0 or not os.path.isdir(procfs.path(pid)):
        raise NoSuchProcess(f"no process with pid {pid}")
    try:
        st = procfs.status(pid)
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    if int(st["Tgid"]) != pid:
        raise NoSuchProcess(f"{pid} is a thread of process {st['Tgid']}, not a process")
    if st["State"].startswith(("Z", "X")) and not procfs.leader_exited(pid):
        raise NoSuchProcess(f"process {pid} is a zombie")
    if pid == os.getpid():
        raise DumpFailed("hpccr cannot dump itself")
    if procfs.ns_pid_depth(pid) != procfs.ns_pid_depth(os.getpid()) and not (
            tree.own_pid_namespace(pid) and procfs.ns_pid_depth(pid) == 1):
        raise UnsupportedResource(f"process {pid} lives in another pid namespace and is not "
                                  "its init (dump the job's pid 1, as hpccr run prints it)")


class Barrier:
    """Where a dump waits for the other parts of a job on several nodes (hpccr/mpi/coordinate.py):
    `frozen()` once its processes are frozen and their connections locked, before anything
    runs again; `complete()` once its image is committed, before the processes are killed,
    stopped or unlocked.  Either raises to abort the dump: the processes run on as before."""

    def frozen(self) -> None:
        pass

    def complete(self) -> None:
        pass


def dump(pid: int, directory: str, mode: str = "kill",
         barrier: Barrier | None = None, compress: bool | None = None,
         tracking: tracking_.Tracking | None = None) -> DumpResult:
    """Checkpoint process `pid` into `directory`; `mode` says what becomes of it afterwards.

    A running dump takes a copy-on-write snapshot of the memory (snapshot.py) of each process
    with much to save (SNAPSHOT_MIN_BYTES): the processes are stopped only while their state is
    read, their memory write-protected and the small ones copied, and the pages of the others
    are copied while they run on. Should the snapshot be lost (the process unmapped memory not yet
    copied, say), the dump starts over with the classic copy inside the freeze. Kill and stopped
    dumps keep the classic copy: such a process must not run past the state the image holds
    (whatever it did meanwhile, output or messages, would happen again after a restore), and
    running while its pages are copied would gain it nothing.

    With a `barrier`, the parts of a job on several nodes are dumped as one: none runs again
    before all are frozen, and none is killed before all images are complete.  A lost snapshot
    then fails the dump (the others would not wait for a second one).

    `compress`: the pages compressed with zstd (image/pages.py); None: the site's setting.

    `tracking`: the trackers of a series of checkpoints (tracking.py): the image leaves to its
    parent, the previous one, the pages its trackers vouch have not changed since, and the
    trackers count from this image on; a failed dump resets them (the next one is full)."""
    assert mode in MODES
    site = config.load()  # before anything: a bad setting stops nothing
    pages = _PageOptions(site.compress if compress is None else compress, site.direct_io)
    with _Step(pid, "looking at the process"):
        check_target(pid)
        network = _network(pid)
    with _Step(pid, "looking for processes that use a GPU"):
        gpus = gpu.Suspension(pid, mode)
    clock = _Clock()
    if gpus and tracking is not None:
        # The driver may write a GPU process's memory behind its page tables (DMA into pinned
        # pages it does not count as such): no page of it is left to a parent.
        tracking.reset()
        tracking = None
    if gpus:
        gpus.suspend()  # their GPU state into their memory, before the freeze (gpu.py)
        faults.point("gpu")
    try:
        result = _dump_in_network(pid, directory, mode, clock, network, barrier, gpus, pages,
                                  tracking)
    except BaseException:
        if tracking is not None:
            tracking.reset()
        if gpus:
            try:
                gpus.resume()
            except HpccrError as exc:
                print(f"hpccr: error: {exc}", file=sys.stderr)
        raise
    if gpus:
        if mode == "running":
            gpus.resume()
        gpus.release()
        result.gpu_s = gpus.seconds
    return result


def _dump_in_network(pid: int, directory: str, mode: str, clock: _Clock,
                     network: netns.Spec | None, barrier: Barrier | None,
                     gpus: gpu.Suspension, pages: _PageOptions,
                     tracking: tracking_.Tracking | None) -> DumpResult:
    # Inside the job's network: its sockets are found and locked there (fds/inet.py).
    with contextlib.ExitStack() as inside:
        if network:
            with _Step(pid, "entering its network namespace"):
                inside.enter_context(netns.entered_of(pid))
        if mode == "running":
            try:
                return _dump(pid, directory, mode, clock, True, network, barrier, gpus,
                             pages, tracking)
            except snapshot.SnapshotLost as lost:
                if barrier is not None:
                    raise DumpFailed(f"memory snapshot lost ({lost})") from None
                print(f"hpccr: warning: memory snapshot lost ({lost}); "
                      "dumping again with the copy inside the freeze", file=sys.stderr)
                if tracking is not None:
                    tracking.reset()
        return _dump(pid, directory, mode, clock, False, network, barrier, gpus, pages,
                     tracking)


def _network(pid: int) -> netns.Spec | None:
    """The network of its own that the job of `pid` has (hpccr run), None if it has ours."""
    try:
        network = netns.of_process(pid)
    except OSError as exc:
        raise DumpFailed(f"cannot read the network of process {pid}: {exc.strerror}") from None
    if network is None and not netns.shares_ours(pid):
        raise UnsupportedResource(f"process {pid} lives in a network namespace that is not "
                                  "an hpccr job's: it could not be made again")
    if network is not None and not tree.own_pid_namespace(pid):
        raise UnsupportedResource(f"process {pid} has a network namespace of its own but is not "
                                  "the pid 1 of its job: dump the job's pid 1")
    return network


class _Clock:
    """Timing of one dump; its frozen time adds up both freezes when a snapshot was lost."""

    def __init__(self):
        self.started = time.monotonic()
        self.frozen_s = 0.0
        self._since: float | None = None

    def freeze(self) -> None:
        self._since = time.monotonic()

    def thaw(self) -> None:
        if self._since is not None:
            self.frozen_s += time.monotonic() - self._since
            self._since = None

    def frozen(self) -> float:
        return self.frozen_s + (time.monotonic() - self._since if self._since is not None else 0)

    def total(self) -> float:
        return time.monotonic() - self.started


def _dump(root: int, directory: str, mode: str, clock: _Clock, cow: bool,
          network: netns.Spec | None, barrier: Barrier | None,
          gpus: gpu.Suspension, page_options: _PageOptions,
          tracking: tracking_.Tracking | None) -> DumpResult:
    increment = _Increment(tracking, mode == "running") if tracking is not None else None
    frozen = FrozenTree(root)
    clock.freeze()
    with _Step(root, "freezing the process tree"):
        frozen.freeze()
    ids = _Ids(root)
    writer = fd_state = None
    readers: list = []
    try:
        writer = ImageWriter(directory)
        ghosts = GhostWriter(writer)
        fd_state = fds.DumpState(writer, ghosts, [_reader(frozen, pid) for pid in frozen.pids],
                                 ids, network is not None)
        procs, copies = [], []
        selected: dict[int, list[tuple[int, int]]] = {}  # pid -> the pages it saves, all
        owner = None if writer.dir_stat.st_uid == 0 else User.owner_of(writer.dir_stat)
        for pid in frozen.pids:
            if pid in frozen.zombies:
                procs.append(_zombie(pid, ids))
                continue
            if owner is not None:
                _check_owner_may_restore(frozen.frozen[pid].reader, owner)
            own_memory = "vm" not in frozen.shared_with_parent.get(pid, [])
            parent = frozen.parent_of(pid)
            forked_from = ((frozen.frozen[parent].reader, selected[parent])
                           if own_memory and parent in selected else None)
            proc, batches, reader = _collect(pid, frozen.frozen[pid], writer, cow, ghosts,
                                             fd_state, ids, own_memory, increment,
                                             forked_from, selected)
            readers.append(reader)
            if owner is not None:
                sched.check(proc, trusted=False)  # what a restore for the owner refuses
            procs.append(proc)
            copies.append((pid, proc, batches, reader))
        for pid, proc in zip(frozen.pids, procs, strict=True):
            proc["shares_with_parent"] = frozen.shared_with_parent.get(pid, [])
        sharing.check(procs)
        sessions.plan({proc["pid"]: proc for proc in procs}, procs[0]["pid"], ids.pidns)
        with _Step(root, "saving SysV IPC objects"):
            sysv_state = sysv.dump_namespace(root, ids.pidns, procs, writer)
        with _Step(root, "comparing open file descriptions"):
            fds.share_descriptions({_reader(frozen, pid): proc["fds"]
                                    for pid, proc, _, _ in copies})
        if barrier is not None:
            barrier.frozen()
        # Processes without a snapshot are copied now, frozen; then the others, running.
        copies.sort(key=lambda copy: isinstance(copy[3], snapshot.Snapshot))
        running = False
        for pid, proc, batches, reader in copies:
            cow = isinstance(reader, snapshot.Snapshot)
            if cow and not running:
                for snap in readers:
                    snap.start()  # all snapshots by now: the others are copied and closed
                frozen.thaw()
                clock.thaw()
                fd_state.finish(None)
                running = True
            with _Step(pid, "copying its memory"), \
                    PageWriter(writer, proc["pid"], *page_options) as pages:
                try:
                    memory.copy_pages(batches, reader, pages,
                                      increment.tracking.copy_buffers if increment else None)
                    if cow:
                        reader.finish()
                        if reader.tracked:
                            clock.freeze()  # for a moment, to hand its memory over
                            try:
                                tracking_.hand_over(reader, pid, increment.trackers[pid])
                            finally:
                                clock.thaw()
                except snapshot.SnapshotLost as lost:
                    raise snapshot.SnapshotLost(f"process {pid}: {lost}") from None
            reader.close()
            readers.remove(reader)
            proc["nr_pages"] = pages.nr_pages
        if mode == "running":
            frozen.thaw()
            clock.thaw()
            fd_state.finish(None)
        header = _header(ids, procs, sysv_state, network, clock.frozen(), clock.total())
        if gpus:
            header["gpu"] = gpus.record(ids.of)
        if increment is not None and increment.inherits:
            header["parent"] = chain.parent_record(increment.parent)
        writer.write_json("image.json", header)
        faults.point("commit")
        path = writer.commit()
        if increment is not None:
            increment.committed(path)
        if barrier is not None:
            try:
                barrier.complete()
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
    except BaseException as exc:
        for reader in readers:
            reader.close()  # before the thaw: no write protection left behind
        if writer is not None:
            writer.abort()
        frozen.thaw()
        clock.thaw()
        if fd_state is not None:
            fd_state.finish(None)
        if isinstance(exc, OSError):
            raise from_oserror(exc, f"dump of process {root}", DumpFailed) from exc
        raise
    if mode == "kill":
        fd_state.before_kill()
        if network is not None:
            netns.disconnect()
        frozen.kill()
        fd_state.finish(str(path))  # connections stay locked until the image is restored
    elif mode == "stopped":
        for pid in frozen.frozen:
            os.kill(pid, 19)  # SIGSTOP: each group stops as soon as it is detached
        frozen.thaw()
        fd_state.finish(None)
    clock.thaw()
    return DumpResult(str(path), clock.frozen(), clock.total(),
                      sum(p["nr_pages"] for p in procs))


def _worth_a_snapshot(ranges: list[tuple[int, int]], tracker: tracking_.Tracker | None) -> bool:
    """Whether a running dump should copy the pages at `ranges` from a snapshot rather than
    inside the freeze (SNAPSHOT_MIN_BYTES, INCREMENT_IN_FREEZE_*)."""
    saving = sum(length for _, length in ranges)
    if (tracker is not None and saving <= INCREMENT_IN_FREEZE_MAX
            and saving <= size(tracker.spans) * INCREMENT_IN_FREEZE_SHARE):
        return False
    return saving >= SNAPSHOT_MIN_BYTES


class _PageOptions(NamedTuple):
    """How the pages files are written (PageWriter): zstd-compressed; with O_DIRECT."""
    compress: bool
    direct: bool


class _Increment:
    """What a series' tracking (tracking.py) brings to one dump: its parent image, if the
    trackers count from it, and the trackers of this dump's processes. `arm`: the processes run
    on, and their trackers track them from this image on."""

    def __init__(self, tracking: tracking_.Tracking, arm: bool):
        self.tracking = tracking
        self.arm = arm
        self.parent: ImageReader | None = None
        parent = tracking.next_parent()
        if parent is not None:
            with contextlib.suppress(HpccrError):
                self.parent = ImageReader(parent)
        self.trackers: dict[int, tracking_.Tracker] = {}
        self.inherits = False  # whether a process left pages to the parent
        self.holds: dict[int, list[tuple[int, int]]] = {}  # pid -> the spans its pages are at

    def scan(self, pid: int) -> tracking_.Tracker | None:
        """The tracker of frozen process `pid`, its pages written since the last checkpoint
        read (and protected again)."""
        tracker = self.tracking.tracker(pid)
        if tracker is not None:
            self.trackers[pid] = tracker
            tracker.scan()
        return tracker

    def open(self, pid: int, inj) -> tracking_.Tracker | None:
        tracker = tracking_.Tracker.open(pid, inj)
        if tracker is not None:
            self.trackers[pid] = tracker
        return tracker

    def leave_to_parent(self, pid: int, tracker: tracking_.Tracker | None, inner: int,
                        ranges: list[tuple[int, int]]):
        """(ranges to save, spans left to the parent): of the (address, length) `ranges` of
        process `pid` (`inner` in the image), the pages its tracker vouches for since the
        parent that the parent holds (saved there or left to its own parent: the ranges of
        that dump, which the tracker keeps, else read from the parent's page lists)."""
        spans = [(addr, addr + length) for addr, length in ranges]
        self.holds[pid] = spans
        if (tracker is None or self.parent is None or tracker.base != self.parent.digest
                or not tracker.covered):
            return ranges, []
        try:
            self.parent.verify_files([pagemap_name(inner), inherited_name(inner)])
            held = tracker.held
            if held is None:
                with PageReader(self.parent, inner) as pages:
                    held = union(spans_of(pages.runs), pages.inherited)
        except HpccrError:
            return ranges, []  # not in the parent, or its files changed: saved whole
        inherited, saved = native.spans_inherit(spans, tracker.covered, tracker.written, held)
        self.inherits = self.inherits or bool(inherited)
        return saved, inherited

    def committed(self, path: str) -> None:
        if self.parent is not None:
            self.parent.close()
        if not self.arm:
            self.tracking.reset()  # the processes are gone, or stopped untracked
            return
        image = ImageReader(path)
        image.close()
        for pid, tracker in self.trackers.items():
            tracker.held = self.holds.get(pid)
        self.tracking.committed(Path(path), image.digest, self.inherits, self.trackers)


def _check_owner_may_restore(pid: int, owner: User) -> None:
    """An image that is not root's restores only what its owner may have (hpccr.user): what
    such a restore would refuse is refused now, with the job running on, not found out then."""
    excess = owner.excess(creds.ids(pid))
    if excess:
        raise AccessDenied(f"process {pid} has {excess}, which user {owner.name}, whose image "
                           "it would be, does not: a restore would refuse it")
    exe = os.readlink(procfs.path(pid, "exe"))
    if not exe.endswith(procfs.DELETED):  # else the restore runs the image's copy
        owner.check_executable(pid, exe)


def _reader(frozen: FrozenTree, pid: int) -> int:
    """The task whose /proc entries show process `pid` of the tree (FrozenProcess.reader)."""
    return frozen.frozen[pid].reader if pid in frozen.frozen else pid


class _Ids:
    """Pids as the image records them: as the job sees them when it has a pid namespace of its
    own (hpccr run), else as hpccr sees them.  Ids outside the job's namespace become 0."""

    def __init__(self, root: int):
        self.pidns = tree.own_pid_namespace(root)
        self.root = root

    def of(self, pid: int, field: str = "NSpid") -> int:
        """`pid`'s own id (NSpid), or its group (NSpgid) or session (NSsid), as recorded."""
        values = procfs.status(pid)[field].split()
        if not self.pidns:
            return int(values[0])
        return int(values[-1]) if len(values) > 1 else 0

    def parent(self, pid: int) -> int:
        if pid == self.root:
            return 0 if self.pidns else int(procfs.status(pid)["PPid"])
        return self.of(int(procfs.status(pid)["PPid"]))

    def thread(self, pid: int, tid: int) -> int:
        values = procfs.status(pid, tid)["NSpid"].split()
        return int(values[-1] if self.pidns else values[0])


def _zombie(pid: int, ids: _Ids) -> dict:
    """A process that exited and waits for its parent: only what its parent will see."""
    st = procfs.status(pid)
    uid, gid = [int(x) for x in st["Uid"].split()], [int(x) for x in st["Gid"].split()]
    return {
        "pid": ids.of(pid), "ppid": ids.parent(pid), "pgid": ids.of(pid, "NSpgid"),
        "sid": ids.of(pid, "NSsid"), "comm": procfs.comm(pid), "exe": "", "cmdline": [],
        "creds": {"uid": uid, "gid": gid, "groups": [], "cap_inh": "0", "cap_prm": "0",
                  "cap_eff": "0", "cap_bnd": "0", "cap_amb": "0", "no_new_privs": 0,
                  "dumpable": 0},
        "cwd": "/", "umask": 0, "personality": 0, "rlimits": {},
        "mm": {**dict.fromkeys([*MM_FIELDS, "brk"], 0), "auxv": ""}, "vmas": [], "pages": "",
        "pagemap": "", "nr_pages": 0, "sigactions": [],
        "itimers": {"real": [0, 0], "virtual": [0, 0], "prof": [0, 0]}, "shared_pending": [],
        "fds": [], "threads": [], "child_subreaper": 0, "pdeathsig": 0,
        "exit_status": tree.exit_status(pid), "stopped": False, "main_thread_exited": False,
        "posix_timers": [],
    }


class _Step:
    """What the dump of process `pid` is doing now (`now`, changed as it goes on): an OSError
    met meanwhile becomes an hpccr error that names both, and an errno without an error class
    of its own a DumpFailed (exit code 18), as does hpccr's own memory running out."""

    def __init__(self, pid: int, now: str):
        self.pid = pid
        self.now = now

    def __enter__(self) -> _Step:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if isinstance(exc, MemoryError):
            raise DumpFailed(f"dump of process {self.pid}: {self.now}: {OWN_MEMORY}") from None
        if not isinstance(exc, OSError):
            return
        if not os.path.isdir(procfs.path(self.pid)):
            raise NoSuchProcess(f"process {self.pid} exited during the dump") from None
        raise from_oserror(exc, f"dump of process {self.pid}: {self.now}", DumpFailed) from exc


def _header(ids: _Ids, procs: list[dict], sysv_state: dict | None,
            network: netns.Spec | None, frozen_s: float, dump_s: float) -> dict:
    features = [p.pop("_xfeatures") for p in procs if "_xfeatures" in p]
    return {
        "format": "hpccr-image", "format_version": 1, "hpccr_version": hpccr.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "kernel": os.uname().release,
        "cpu": {"xfeatures": features[0][0], "xstate_size": features[0][1]},
        "root_pid": procs[0]["pid"], "pidns": ids.pidns, "sysv": sysv_state,
        "network": network.to_image() if network else None,
        "timing": {"frozen_s": round(frozen_s, 6), "dump_s": round(dump_s, 6)},
        "processes": procs,
    }


def _collect(pid: int, frozen: FrozenProcess, writer, cow: bool, ghosts, fd_state, ids: _Ids,
             own_memory: bool = True, increment: _Increment | None = None,
             forked_from: tuple[int, list[tuple[int, int]]] | None = None,
             selected: dict[int, list[tuple[int, int]]] | None = None):
    """Read every piece of state of the frozen process, streaming blobs into `writer`; returns
    its record, the batches of pages to save, and their reader: a Snapshot that has already
    write-protected them if `cow` and possible, else a MemoryReader for a copy in the freeze.
    A process whose address space is its parent's (CLONE_VM) has no memory of its own saved.
    Its state is read through `frozen.reader`: a thread that still runs, if the main thread has
    exited. With an `increment`, the pages its tracker vouches for are left to the parent
    image, and the tracker is armed again (or its snapshot tracked, to hand over later).
    `forked_from`: its parent (the pid to read it through, the pages it saves, all of them):
    the pages the two still share since fork are saved once, with the parent's.  The pages
    this process saves, all of them, go into `selected` for its own children."""
    at = frozen.reader
    snap = tracker = None
    # (Not a process whose main thread has exited: its /proc entries are another thread's.)
    track = increment is not None and own_memory and at == pid
    try:
        with _Step(pid, "reading its memory mappings") as step:
            entries, left_behind = (parasite.without_scratch_left(at, procfs.maps(at))
                                    if own_memory else ([], []))  # before the new scratch
            vmas = memory.describe_vmas(at, entries, ghosts)
            step.now = "reading its file descriptors"
            fd_entries = fds.dump_fds(at, fd_state)
            step.now = "reading its page map"
            stat = procfs.stat(at)
            unreadable = [(v["start"], v["end"]) for v in vmas if v["prot"][0] != "r"]
            ranges = memory.select_pages(at, vmas)
            if selected is not None and own_memory:
                selected[pid] = ranges
            forked = []
            if forked_from is not None:
                step.now = "comparing its pages with its parent's"
                forked = memory.shared_with_parent(at, forked_from[0], ranges, forked_from[1])
                ranges = [(start, end - start) for start, end in
                          subtract([(a, a + n) for a, n in ranges], forked)]
            inherited = []
            if track:
                step.now = "looking for the pages it wrote since the last checkpoint"
                tracker = increment.scan(pid)
                ranges, inherited = increment.leave_to_parent(pid, tracker, ids.of(pid),
                                                                ranges)
            step.now = "asking it for its state by injected system calls"
            inj = parasite.LiveInjector(at, frozen.threads[at], left_behind)
            try:
                sigio.dump(inj, at, fd_entries)
                proc_creds = creds.dump_creds(at, inj)
                rlimits = creds.dump_rlimits(inj)
                attributes = prctls.dump(inj)
                sigactions = signals.dump_sigactions(inj)
                itimers = signals.dump_itimers(inj)
                timers = posix_timers.dump_timers(inj, at, lambda tid: ids.thread(pid, tid))
                brk = inj.call("brk", 0)
                xcomp_perm = threads.dump_xcomp_perm(inj)
                thread_records = []
                for tid, thread in frozen.threads.items():
                    record = threads.dump_thread(inj, pid, thread)
                    record["sigaltstack"] = signals.dump_altstack(inj, thread)
                    record["sched"] = sched.dump(pid, tid)
                    thread_records.append((tid, thread, record))
                if track and tracker is None:
                    tracker = increment.open(pid, inj)
                if cow and _worth_a_snapshot(ranges, tracker):
                    snap = snapshot.Snapshot.open(at, inj, tracker is not None and increment.arm)
            finally:
                inj.close()
            step.now = "reading its threads' registers"
            xfeatures = None
            for tid, thread, record in thread_records:
                xstate = native.get_xstate(tid)
                xfeatures = xfeatures or (cpu.xfeatures(xstate), len(xstate))
                record["tid"] = ids.thread(pid, tid)
                name = f"xstate-{record['tid']}.bin"
                writer.write_bytes(name, xstate)
                record.update({
                    "regs": native.regs_to_dict(thread.regs), "xstate": name,
                    "xcomp_perm": xcomp_perm, "sigmask": thread.sigmask,
                    "pending": signals.dump_pending(tid, shared=False),
                })
            step.now = "write-protecting its memory for the snapshot"
            if snap is not None and tracker is not None:
                tracker.disarm()  # a range has one userfaultfd: the snapshot's, for a while
            if snap is not None and not snap.protect(vmas, ranges, unreadable):
                snap.close()
                snap = None
            if tracker is not None and increment.arm and snap is None:
                step.now = "tracking the pages it writes from now on"
                tracker.arm(tracking_.trackable(at))
                tracker.covered, tracker.written = list(tracker.spans), []
            if inherited:
                writer.write_bytes(inherited_name(ids.of(pid)), pack_runs(inherited))
            if forked:
                writer.write_bytes(forked_name(ids.of(pid)), pack_runs(forked))
            step.now = "reading its memory layout, executable and working directory"
            mm = {name: int(stat[i]) for name, i in MM_FIELDS.items()}
            mm["brk"] = brk
            mm["auxv"] = base64.b64encode(procfs.auxv(at)).decode()
            inner = ids.of(pid)
            proc = {
                "pid": inner, "ppid": ids.parent(pid), "pgid": ids.of(pid, "NSpgid"),
                "sid": ids.of(pid, "NSsid"),
                "comm": procfs.comm(pid), "exe": os.readlink(procfs.path(at, "exe")),
                "cmdline": procfs.cmdline(at), "creds": proc_creds,
                "cwd": os.readlink(procfs.path(at, "cwd")), "umask": creds.umask(at),
                "personality": procfs.personality(at), "rlimits": rlimits,
                "mm": mm, "vmas": vmas, "pages": f"pages-{inner}.img",
                "pagemap": f"pagemap-{inner}.bin", "nr_pages": 0, "sigactions": sigactions,
                "itimers": itimers, "posix_timers": timers,
                "shared_pending": signals.dump_pending(at, shared=True),
                "fds": fd_entries, "threads": [record for _, _, record in thread_records],
                **attributes, "exit_status": None, "stopped": frozen.stopped,
                "main_thread_exited": frozen.main_thread_exited,
                "_xfeatures": xfeatures,
            }
    except BaseException:
        if snap is not None:
            snap.close()
        raise
    if snap is not None:
        return proc, snap.batches, snap
    return proc, list(memory.split_batches(ranges)), memory.MemoryReader(at, unreadable)
