"""Dump one process (all its threads) into an image directory.

Order matters for the "never lose the job" rule: the process is frozen, everything is read and
streamed into a temporary image, and only a committed image allows the process to be killed.
Any failure before that thaws the process exactly as it was and removes the partial image.
"""

from __future__ import annotations

import base64
import datetime
import os
import socket
import time
from dataclasses import dataclass

import hpccr
from hpccr import native
from hpccr.engine import cpu, creds, fds, memory, procfs, signals, threads
from hpccr.engine.ghosts import GhostWriter
from hpccr.engine.tracer import FrozenProcess, Injector
from hpccr.errors import DumpFailed, HpccrError, NoSuchProcess, UnsupportedResource, from_oserror
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
    """Checkpoint process `pid` into `directory`; `mode` says what becomes of it afterwards."""
    assert mode in MODES
    check_target(pid)
    started = time.monotonic()
    frozen = FrozenProcess(pid)
    frozen.freeze()
    thawed_at = None
    writer = None
    try:
        writer = ImageWriter(directory)
        proc, nr_pages = _collect(pid, frozen, writer)
        if mode == "running":
            frozen.thaw()
            thawed_at = time.monotonic()
        frozen_s = (thawed_at or time.monotonic()) - started
        writer.write_json("image.json", _header(pid, proc, frozen_s, time.monotonic() - started))
        path = writer.commit()
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        frozen.thaw()
        if isinstance(exc, OSError):
            raise DumpFailed(f"dump of process {pid} failed: {exc}") from exc
        raise
    if mode == "kill":
        frozen.kill()
    elif mode == "stopped":
        os.kill(pid, 19)  # SIGSTOP: the group stops as soon as it is detached
        frozen.thaw()
    return DumpResult(str(path), (thawed_at or time.monotonic()) - started,
                      time.monotonic() - started, nr_pages)


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


def _collect(pid: int, frozen: FrozenProcess, writer) -> tuple[dict, int]:
    """Read every piece of state of the frozen process; stream pages and blobs into `writer`."""
    leader = frozen.threads[pid]
    try:
        entries = procfs.maps(pid)  # before the injector maps its scratch area
        ghosts = GhostWriter(writer)
        vmas = memory.describe_vmas(pid, entries, ghosts)
        fd_entries = fds.dump_fds(pid, ghosts)
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
        pages = PageWriter(writer, pid)
        reader = memory.MemoryReader(pid, unreadable)
        try:
            memory.copy_pages(memory.split_batches(ranges), reader, pages)
        finally:
            reader.close()
        pages.close()
    except HpccrError:
        raise
    except OSError as exc:
        if not os.path.isdir(procfs.path(pid)):
            raise NoSuchProcess(f"process {pid} exited during the dump") from None
        raise from_oserror(exc, f"dump of process {pid}") from exc
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
        "mm": mm, "vmas": vmas, "pages": f"pages-{pid}.img", "pagemap": f"pagemap-{pid}.bin",
        "nr_pages": pages.nr_pages, "sigactions": sigactions, "itimers": itimers,
        "shared_pending": signals.dump_pending(pid, shared=True), "fds": fd_entries,
        "threads": [record for _, _, record in thread_records],
        "_xfeatures": xfeatures,
    }
    return proc, pages.nr_pages
