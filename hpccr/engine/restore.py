"""Restore one process (all its threads) from an image directory.

The new task gets the saved pid (clone3 set_tid), reopens its descriptors, then execs the static
stub under PTRACE_TRACEME.  From the stub's first stop on, everything is done by system calls
injected into it: the address space is replaced with the saved one, threads are cloned with their
saved tids, signal state and credentials are put back, and the saved registers are loaded.  Until
the final detach the task is killed if anything fails (or if hpccr itself dies: EXITKILL), and the
image is only ever read.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import signal
import struct

from hpccr import native
from hpccr.engine import cpu, creds, fds, memory, procfs, signals, threads
from hpccr.engine.ghosts import GhostFiles
from hpccr.engine.tracer import ALL_SIGNALS, SYSCALL_INT3, Injector, Thread
from hpccr.errors import (
    AccessDenied,
    FileMismatch,
    HpccrError,
    IncompatibleMachine,
    PidInUse,
    RestoreFailed,
    UnsupportedResource,
)
from hpccr.image import ImageReader, PageReader
from hpccr.image.series import resolve

PR_SET_MM, PR_SET_MM_MAP = 35, 14
AT_ENTRY = 9
STUB_INJECT_OFFSET = 9
MM_MAP = struct.Struct("<11QQII")  # struct prctl_mm_map
AT_FDCWD = -100
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGCONT)


class Context:
    """What the restore of one process needs along the way."""

    def __init__(self, reader: ImageReader, proc: dict):
        self.reader = reader
        self.proc = proc
        uid, gid = proc["creds"]["uid"], proc["creds"]["gid"]
        self.ghosts = GhostFiles(reader, uid[1], gid[1])
        # An image only root could have written may hold what the process opened before it
        # dropped privileges (files, a cwd it can no longer reach): those are reopened as root.
        # A user's own image gets nothing its user could not open.
        self.trusted = os.stat(reader.path).st_uid == 0
        self.fsuid, self.fsgid = uid[1], gid[1]

    def as_owner(self, call, *args):
        """call(*args) with the file-system rights of the process's user (set by the caller),
        retried with root's only for a trusted image."""
        try:
            return call(*args)
        except PermissionError:
            if not self.trusted:
                raise
            native.syscall("setfsuid", 0)
            native.syscall("setfsgid", 0)
            try:
                return call(*args)
            finally:
                native.syscall("setfsgid", self.fsgid)
                native.syscall("setfsuid", self.fsuid)


def load(directory: str) -> tuple[ImageReader, dict]:
    reader = ImageReader(resolve(directory))
    reader.verify()
    meta = reader.meta()
    if len(meta["processes"]) != 1:
        raise UnsupportedResource("images of several processes need the process-tree restore "
                                  "(not supported yet)")
    return reader, meta


def restore(directory: str, detach: bool = False, pidfile: str | None = None) -> int:
    """Restore the image; returns the restored process's exit status (0 with `detach`)."""
    reader, meta = load(directory)
    proc = meta["processes"][0]
    preflight(reader, meta, proc)
    ctx = Context(reader, proc)
    for e in proc["fds"]:  # made here: the new task only opens them, the parent deletes them
        if e["ghost"]:
            ctx.ghosts.path(e["ghost"], e["mode"])
    pid = spawn(ctx)
    try:
        rebuild(ctx, pid, meta)
    except BaseException as exc:
        _kill_half_restored(pid)
        if isinstance(exc, HpccrError):
            raise
        if isinstance(exc, OSError):
            raise RestoreFailed(f"restore of process {proc['pid']} failed: {exc}") from exc
        raise
    finally:
        ctx.ghosts.unlink_all()
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{pid}\n")
    if detach:
        return 0
    return wait_for(pid)


def preflight(reader: ImageReader, meta: dict, proc: dict) -> None:
    """Everything that can be checked before a task exists."""
    if os.geteuid() != 0:
        raise AccessDenied("restoring exact pids needs root (CAP_CHECKPOINT_RESTORE)")
    owner = os.stat(reader.path).st_uid
    uids = proc["creds"]["uid"]
    if owner != 0 and any(u != owner for u in uids):
        raise AccessDenied(f"image owned by uid {owner} asks for uids {uids}: refused")
    for t in proc["threads"]:
        if os.path.exists(procfs.path(t["tid"])) or os.path.exists(
                procfs.path(proc["pid"], "task", str(t["tid"]))):
            who = procfs.comm(t["tid"]) if os.path.exists(procfs.path(t["tid"])) else "?"
            raise PidInUse(f"pid {t['tid']} is in use (by '{who}'); the image needs it free")
    for v in proc["vmas"]:
        f = v["file"]
        if v["kind"] != "file" or f is None:
            continue
        try:
            st = os.stat(v["path"])
        except OSError:
            raise FileMismatch(f"mapped file {v['path']} is missing") from None
        if st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]:
            raise FileMismatch(f"mapped file {v['path']} changed since the checkpoint")
    fds.check_fds(proc["fds"], None)


def spawn(ctx: Context) -> int:
    """Create the task with the saved pid, descriptors, cwd and umask; stop it at the stub."""
    proc = ctx.proc
    rd, wr = os.pipe2(os.O_CLOEXEC)
    try:
        pid = native.fork_with_pid(proc["pid"])
    except OSError as exc:
        os.close(rd)
        os.close(wr)
        if exc.errno == errno.EEXIST:
            raise PidInUse(f"pid {proc['pid']} is in use") from None
        if exc.errno == errno.EPERM:
            raise AccessDenied("clone3 with set_tid was refused (CAP_CHECKPOINT_RESTORE?)") \
                from None
        raise RestoreFailed(f"cannot create a task with pid {proc['pid']}: {exc}") from None
    if pid == 0:
        _child(ctx, wr)
    os.close(wr)
    with os.fdopen(rd, "rb") as pipe:
        error = pipe.read().decode(errors="replace")
    if error:
        os.waitpid(pid, 0)
        raise RestoreFailed(f"preparing the new task failed: {error}")
    take_over(pid)
    return pid


def take_over(pid: int) -> None:
    """Seize a task that exec'd the stub (it waits in pause()) and stop it for injection."""
    try:
        native.seize(pid, native.PTRACE_O_EXITKILL | native.PTRACE_O_TRACECLONE)
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


def _child(ctx: Context, errpipe: int) -> None:
    """Runs in the new task: never returns."""
    errpipe = fcntl_dup_high(errpipe, ctx.proc)
    try:
        proc = ctx.proc
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        if proc["sid"] == proc["pid"]:
            os.setsid()  # it led its session (and group): it leads a new one
        elif proc["pgid"] == proc["pid"]:
            os.setpgid(0, 0)
        uid, gid = proc["creds"]["uid"], proc["creds"]["gid"]
        # Open files with the process's own rights, not root's.
        os.setgroups(proc["creds"]["groups"])
        native.syscall("setfsgid", gid[1])
        native.syscall("setfsuid", uid[1])
        ctx.as_owner(os.chdir, proc["cwd"])
        fds.install_fds(proc["fds"], ctx, errpipe)
        native.syscall("setfsuid", 0)
        native.syscall("setfsgid", 0)
        os.umask(proc["umask"])
        native.syscall("personality", proc["personality"])
        os.execve(native.stub_path(), ["hpccr-stub"], {})
    except BaseException as exc:  # report, whatever it was, then die
        msg = exc.strerror if isinstance(exc, OSError) and exc.filename is None else str(exc)
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.filename}: {exc.strerror}"
        try:
            os.write(errpipe, msg.encode() or repr(exc).encode())
        except OSError:
            pass
    finally:
        os._exit(127)


def fcntl_dup_high(fd: int, proc: dict) -> int:
    """Move the error pipe above every descriptor the image wants."""
    top = max([e["fd"] for e in proc["fds"]] + [2]) + 64
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)
    os.close(fd)
    return high


def rebuild(ctx: Context, pid: int, meta: dict) -> None:
    proc = ctx.proc
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
    inj = Injector(pid, stub, at=scratch_at, bootstrap_ip=stub_inject_ip(pid))
    occupied.append((inj.base, inj.base + inj.size))

    specials = memory.clear_stub(inj, pid)
    memory.move_specials(inj, specials, proc["vmas"], occupied)
    _restore_address_space(ctx, inj, pid)
    threads.restore_xcomp_perm(inj, proc["threads"][0]["xcomp_perm"])
    signals.restore_sigactions(inj, proc["sigactions"])
    fds.set_cloexec(inj, proc["fds"])

    tasks = [(stub, proc["threads"][0])]
    for saved in proc["threads"][1:]:
        tid = threads.create_thread(inj, saved["tid"])
        if tid != saved["tid"]:
            raise RestoreFailed(f"thread got tid {tid} instead of {saved['tid']}")
        t = Thread(tid)
        t.capture()
        tasks.append((t, saved))
    for thread, saved in tasks:
        threads.restore_thread(inj, thread, saved)
        signals.restore_altstack(inj, thread, saved["sigaltstack"])
    signals.restore_itimers(inj, proc["itimers"])
    signals.queue_pending(inj, pid, None, proc["shared_pending"])
    for thread, saved in tasks:
        signals.queue_pending(inj, pid, thread, saved["pending"])
    creds.restore_rlimits(pid, proc["rlimits"])
    # The injection page must go before credentials drop: munmap needs no privilege, but the
    # page must not outlive the restore.  Credentials come last, thread by thread.
    for thread, _ in tasks[1:]:
        creds.restore_creds(inj, thread, proc["creds"])
    creds.restore_creds(inj, stub, proc["creds"])
    xstates = [ctx.reader.read_bytes(saved["xstate"]) for _, saved in tasks]
    for (thread, _), xstate in zip(tasks, xstates, strict=True):
        if cpu.uses_amx_tiles(xstate):
            threads.touch_amx(inj, thread)
    inj.close(code_ip=proc["threads"][0]["regs"]["rip"])
    for (thread, saved), xstate in zip(tasks, xstates, strict=True):
        _load_cpu(thread, saved, xstate)
    for thread, saved in tasks:
        native.set_sigmask(thread.tid, saved["sigmask"])
    ctx.ghosts.unlink_all()  # deleted files are deleted again before the process runs
    for thread, _ in reversed(tasks):
        native.detach(thread.tid, 0)


def _restore_address_space(ctx: Context, inj: Injector, pid: int) -> None:
    proc = ctx.proc
    cr = proc["creds"]
    exe_fd = _open_in_target(inj, proc["exe"], os.O_RDONLY)  # as root: only a link is set
    inj.call("setgroups", 0, 0)
    inj.call("setfsgid", cr["gid"][1])
    inj.call("setfsuid", cr["uid"][1])
    opened: dict[tuple[str, int], int] = {}

    def open_file(vma: dict) -> int:
        path = vma["path"]
        if vma["kind"] == "ghost":
            path = ctx.ghosts.path(vma["file"]["ghost"], 0o600)
        flags = os.O_RDWR if vma["shared"] and vma["prot"][1] == "w" else os.O_RDONLY
        if (path, flags) not in opened:
            try:
                opened[(path, flags)] = _open_in_target(inj, path, flags)
            except PermissionError:
                if not ctx.trusted:
                    raise FileMismatch(f"cannot open mapped file {vma['path']}: "
                                       "permission denied") from None
                inj.call("setfsuid", 0)
                inj.call("setfsgid", 0)
                opened[(path, flags)] = _open_in_target(inj, path, flags)
                inj.call("setfsgid", cr["gid"][1])
                inj.call("setfsuid", cr["uid"][1])
            except OSError as exc:
                raise FileMismatch(f"cannot open mapped file {vma['path']}: "
                                   f"{os.strerror(exc.errno)}") from None
        return opened[(path, flags)]

    memory.map_vmas(inj, proc["vmas"], open_file)
    for fd in opened.values():
        inj.call("close", fd)
    if proc["nr_pages"]:
        memory.write_pages(pid, PageReader(ctx.reader, proc["pid"]))
    memory.protect_vmas(inj, proc["vmas"])
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


def _kill_half_restored(pid: int) -> None:
    """Kill the task being built and reap it and its traced threads."""
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return
    while True:
        try:
            reaped, _ = os.waitpid(-1, native.WALL)
        except ChildProcessError:
            return
        if reaped == pid:
            return


def wait_for(pid: int) -> int:
    """Wait for the restored process like a parent would; forward the usual signals to it."""
    def forward(signo, _frame):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
