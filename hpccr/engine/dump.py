"""Dump one process (all its threads) into an image directory.

Order matters for the "never lose the job" rule: the process is frozen, everything is read and
streamed into a temporary image, and only a committed image allows the process to be killed.
Any failure before that thaws the process exactly as it was and removes the partial image.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass

import hpccr
from hpccr import native
from hpccr.engine import cpu, creds, fds, memory, procfs, signals, snapshot, threads
from hpccr.engine.ghosts import GhostWriter
from hpccr.engine.tracer import FrozenProcess, Injector
from hpccr.errors import DumpFailed, NoSuchProcess, UnsupportedResource, from_oserror
from hpccr.image import ImageWriter, PageWriter

MODES = ("kill", "running", "stopped")


@dataclass
class DumpResult:
    path: str
    frozen_s: float
    dump_s: float
    pages: int


def check_target(pid: int) -> None:
    if pid <= 0 or not os.path.isdir(procfs.path(pid)):
        raise NoSuchProcess(f"no process with pid {pid}")
    try:
        st = procfs.status(pid)
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    if int(st["Tgid"]) != pid:
        raise NoSuchProcess(f"{pid} is a thread of process {st['Tgid']}, not a process")
    if st["State"].startswith(("Z", "X")):
        raise NoSuchProcess(f"process {pid} is a zombie")
    if pid == os.getpid():
        raise DumpFailed("hpccr cannot dump itself")
    if procfs.ns_pid_depth(pid) != procfs.ns_pid_depth(os.getpid()):
        raise UnsupportedResource(f"process {pid} lives in another pid namespace "
                                  "(not supported yet)")


def dump(pid: int, directory: str, mode: str = "kill") -> DumpResult:
    """Checkpoint process `pid` into `directory`; `mode` says what becomes of it afterwards.

    A running dump takes a copy-on-write snapshot of the memory (snapshot.py): the process is
    stopped only while its state is read and its memory write-protected, and its pages are
    copied while it runs on. Should the snapshot be lost (the process unmapped memory not yet
    copied, say), the dump starts over with the classic copy inside the freeze. Kill and stopped
    dumps keep the classic copy: such a process must not run past the state the image holds
    (whatever it did meanwhile, output or messages, would happen again after a restore), and
    running while its pages are copied would gain it nothing."""
    assert mode in MODES
    check_target(pid)
    clock = _Clock()
    if mode == "running":
        try:
            return _dump(pid, directory, mode, clock, cow=True)
        except snapshot.SnapshotLost as lost:
            print(f"hpccr: warning: memory snapshot of process {pid} lost ({lost}); "
                  "dumping again with the copy inside the freeze", file=sys.stderr)
    return _dump(pid, directory, mode, clock, cow=False)


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


def _dump(pid: int, directory: str, mode: str, clock: _Clock, cow: bool) -> DumpResult:
    frozen = FrozenProcess(pid)
    clock.freeze()
    frozen.freeze()
    writer = reader = None
    try:
        writer = ImageWriter(directory)
        proc, batches, reader = _collect(pid, frozen, writer, cow)
        cow = isinstance(reader, snapshot.Snapshot)
        if cow:
            reader.start()
            frozen.thaw()
            clock.thaw()
        with _reading(pid), PageWriter(writer, pid) as pages:
            memory.copy_pages(batches, reader, pages)
            if cow:
                reader.finish()
        reader.close()
        reader = None
        proc["nr_pages"] = pages.nr_pages
        if mode == "running":
            frozen.thaw()
            clock.thaw()
        writer.write_json("image.json", _header(pid, proc, clock.frozen(), clock.total()))
        path = writer.commit()
    except BaseException as exc:
        if reader is not None:
            reader.close()  # before the thaw: no write protection left behind
        if writer is not None:
            writer.abort()
        frozen.thaw()
        clock.thaw()
        if isinstance(exc, OSError):
            raise DumpFailed(f"dump of process {pid} failed: {exc}") from exc
        raise
    if mode == "kill":
        frozen.kill()
    elif mode == "stopped":
        os.kill(pid, 19)  # SIGSTOP: the group stops as soon as it is detached
        frozen.thaw()
    clock.thaw()
    return DumpResult(str(path), clock.frozen(), clock.total(), proc["nr_pages"])


@contextlib.contextmanager
def _reading(pid: int):
    """Errors met while reading the target, as hpccr errors."""
    try:
        yield
    except OSError as exc:
        if not os.path.isdir(procfs.path(pid)):
            raise NoSuchProcess(f"process {pid} exited during the dump") from None
        raise from_oserror(exc, f"dump of process {pid}") from exc


def _header(pid: int, proc: dict, frozen_s: float, dump_s: float) -> dict:
    xstate_features = proc.pop("_xfeatures")
    return {
        "format": "hpccr-image", "format_version": 1, "hpccr_version": hpccr.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "kernel": os.uname().release,
        "cpu": {"xfeatures": xstate_features[0], "xstate_size": xstate_features[1]},
        "root_pid": pid,
        "timing": {"frozen_s": round(frozen_s, 6), "dump_s": round(dump_s, 6)},
        "processes": [proc],
    }


def _collect(pid: int, frozen: FrozenProcess, writer, cow: bool):
    """Read every piece of state of the frozen process, streaming blobs into `writer`; returns
    its record, the batches of pages to save, and their reader: a Snapshot that has already
    write-protected them if `cow` and possible, else a MemoryReader for a copy in the freeze."""
    leader = frozen.threads[pid]
    snap = None
    try:
        with _reading(pid):
            entries = procfs.maps(pid)  # before the injector maps its scratch area
            ghosts = GhostWriter(writer)
            vmas = memory.describe_vmas(pid, entries, ghosts)
            fd_entries = fds.dump_fds(pid, fds.DumpState(writer, ghosts, [pid]))
            fds.share_descriptions({pid: fd_entries})
            stat = procfs.stat(pid)
            inj = Injector(pid, leader)
            try:
                proc_creds = creds.dump_creds(pid, inj)
                rlimits = creds.dump_rlimits(inj)
                sigactions = signals.dump_sigactions(inj)
                itimers = signals.dump_itimers(inj)
                brk = inj.call("brk", 0)
                xcomp_perm = threads.dump_xcomp_perm(inj)
                thread_records = []
                for tid, thread in frozen.threads.items():
                    record = threads.dump_thread(inj, pid, thread)
                    record["sigaltstack"] = signals.dump_altstack(inj, thread)
                    thread_records.append((tid, thread, record))
                if cow:
                    snap = snapshot.Snapshot.open(pid, inj)
            finally:
                inj.close()
            xfeatures = None
            for tid, thread, record in thread_records:
                xstate = native.get_xstate(tid)
                xfeatures = xfeatures or (cpu.xfeatures(xstate), len(xstate))
                writer.write_bytes(f"xstate-{tid}.bin", xstate)
                record.update({
                    "regs": native.regs_to_dict(thread.regs), "xstate": f"xstate-{tid}.bin",
                    "xcomp_perm": xcomp_perm, "sigmask": thread.sigmask,
                    "pending": signals.dump_pending(tid, shared=False),
                })
            unreadable = [(v["start"], v["end"]) for v in vmas if v["prot"][0] != "r"]
            ranges = memory.select_pages(pid, vmas)
            if snap is not None and not snap.protect(vmas, ranges, unreadable):
                snap.close()
                snap = None
            mm_fields = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
                         "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49,
                         "env_start": 50, "env_end": 51}
            mm = {name: int(stat[i]) for name, i in mm_fields.items()}
            mm["brk"] = brk
            mm["auxv"] = base64.b64encode(procfs.auxv(pid)).decode()
            proc = {
                "pid": pid, "ppid": int(stat[4]), "pgid": int(stat[5]), "sid": int(stat[6]),
                "comm": procfs.comm(pid), "exe": os.readlink(procfs.path(pid, "exe")),
                "cmdline": procfs.cmdline(pid), "creds": proc_creds,
                "cwd": os.readlink(procfs.path(pid, "cwd")), "umask": creds.umask(pid),
                "personality": procfs.personality(pid), "rlimits": rlimits,
                "mm": mm, "vmas": vmas, "pages": f"pages-{pid}.img",
                "pagemap": f"pagemap-{pid}.bin", "nr_pages": 0, "sigactions": sigactions,
                "itimers": itimers, "shared_pending": signals.dump_pending(pid, shared=True),
                "fds": fd_entries, "threads": [record for _, _, record in thread_records],
                "_xfeatures": xfeatures,
            }
    except BaseException:
        if snap is not None:
            snap.close()
        raise
    if snap is not None:
        return proc, snap.batches, snap
    return proc, list(memory.split_batches(ranges)), memory.MemoryReader(pid, unreadable)
