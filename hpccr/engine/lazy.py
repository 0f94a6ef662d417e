"""Lazy restore (`hpccr restore --lazy --detach`): the job runs before its memory is back.

The memory placement.py places (private anonymous VMAs) is registered with a userfaultfd and is
not written before the job runs.  The process the restore goes on in after the command has
returned, the filler, places each page the job touches when it faults (FAULT_AROUND bytes at a
time) and meanwhile streams all the others in the order of the pages file, UFFDIO_COPY both.
Once every page is in, it lets go of the job and ends.

A page must never read as what it was not:
- The job's changes to its memory come as userfaultfd events (placement.LAZY_FEATURES): a child
  forked (with a userfaultfd of its own, the same pages missing), memory moved (mremap),
  dropped (MADV_DONTNEED: zeros from then on) or unmapped.  Each is read and applied under the
  lock every placement holds; until it is read, the kernel refuses placements in that mm
  (EAGAIN), so nothing lands where the job has just changed its memory.
- A fault on a page of no saved run (never saved, or dropped since) gets the zero page.
- The filler's death would close its userfaultfds, and every page still missing would read as
  zeros: so it holds every thread of these processes (and of those they make) with ptrace and
  PTRACE_O_EXITKILL until the last page is in, passing their signals and stops on: its death
  kills them.  Killing the `hpccr restore` command changes nothing.
- The pages files are checked as they are streamed; a mismatch or a read error kills the job the
  same way (its memory cannot be completed), with one line on the restore's standard error.  The
  image is left as it was, to be restored again.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import select
import signal
import sys
import threading
import traceback

from hpccr import errors, faults, native
from hpccr.engine.snapshot import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMAP,
    UFFD_EVENT_REMOVE,
    UFFD_EVENT_UNMAP,
    UFFD_MSG,
    UFFDIO_WAKE,
    uffd_ioctl,
)
from hpccr.errors import HpccrError, RestoreFailed, starting_threads
from hpccr.spans import intersect, subtract, union

PAGE = native.PAGE_SIZE
UFFD_EVENT_FORK = 0x13
FAULT_AROUND = 64 << 10  # placed at once around a faulting page: the next accesses are near
WRITE_BATCH = 8 << 20  # the pages outside the registered VMAs, written before the job runs
STREAM_HELD = 2  # chunks of the pages file held while the next is read
EVENT_WAIT_S = 0.05  # a placement refused (EAGAIN) is tried again once an event is read, or then
NEW_TASK_EVENTS = (native.PTRACE_EVENT_FORK, native.PTRACE_EVENT_VFORK, native.PTRACE_EVENT_CLONE)
HOLD_OPTIONS = (native.PTRACE_O_EXITKILL | native.PTRACE_O_TRACECLONE
                | native.PTRACE_O_TRACEFORK | native.PTRACE_O_TRACEVFORK)
GROUP_STOPS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
UNSTOPPABLE = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP)


class Missing:
    """The pages still missing in one mm, whose userfaultfd is `uffd`: sorted, disjoint pieces
    (start, end, source, offset), the bytes at `offset` of pages file `source` go at start."""

    def __init__(self, uffd: int, pieces: list[tuple[int, int, int, int]]):
        self.uffd = uffd
        self.pieces = pieces
        self.faults: list[int] = []  # pages the job waits for

    def overlapping(self, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        i, j = self._range(lo, hi)
        return self.pieces[i:j]

    def cut(self, lo: int, hi: int) -> None:
        """[lo, hi) is missing no more (placed, dropped or unmapped)."""
        i, j = self._range(lo, hi)
        rest = []
        for start, end, source, at in self.pieces[i:j]:
            if start < lo:
                rest.append((start, lo, source, at))
            if end > hi:
                rest.append((hi, end, source, at + hi - start))
        self.pieces[i:j] = rest

    def move(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old + length) to `new`."""
        moved = [(max(start, old) - old + new, min(end, old + length) - old + new, source,
                  at + max(start, old) - start)
                 for start, end, source, at in self.overlapping(old, old + length)]
        self.cut(old, old + length)
        self.cut(new, new + length)
        self.pieces = sorted(self.pieces + moved)

    def _range(self, lo: int, hi: int) -> tuple[int, int]:
        """The indexes [i, j) of the pieces that overlap [lo, hi)."""
        i = j = bisect.bisect_right(self.pieces, lo, key=lambda piece: piece[1])
        while j < len(self.pieces) and self.pieces[j][0] < hi:
            j += 1
        return i, j


class LazyPages:
    """The memory of the restored processes still to be placed, and the filler's threads that
    place it: one serves the page faults and reads the events, one streams."""

    def __init__(self):
        self.sources: list = []  # PageReaders (uncompressed): `source` of the pieces
        self.pids: set[int] = set()  # the processes whose memory is lazy (as hpccr sees them)
        self.tids: list[int] = []  # their threads, held from the release on (restore.py)
        self.report = -1  # until the job runs: where a failure is told (restore_detached)
        self._mms: dict[int, Missing] = {}  # by userfaultfd
        self._retired: list[int] = []  # userfaultfds of mms gone (exit, exec)
        self._lock = threading.Condition()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._server: threading.Thread | None = None
        self._streamer: threading.Thread | None = None
        self._stopping = False
        self._streamed = threading.Event()
        self._streamed_r, self._streamed_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def add(self, pid: int, placer, sources) -> None:
        """Take over the pages of process `pid` from its page `sources` ((PageReader, spans),
        chain.page_sources) inside the VMAs registered with `placer` (and its userfaultfd);
        the others are written now.  Closes the sources it does not keep."""
        pieces = []
        try:
            for number, (reader, spans) in enumerate(sources):
                runs = sorted(reader.runs)
                stored = [(vaddr, vaddr + nr * PAGE) for vaddr, nr, _ in runs]
                wanted = stored if spans is None else intersect(stored, spans)
                _write_now(pid, reader, runs, subtract(wanted, placer.registered))
                lazy = intersect(wanted, placer.registered)
                if lazy:
                    pieces += _pieces(lazy, runs, len(self.sources))
                    self.sources.append(reader)
                    sources[number] = (None, None)
                else:
                    reader.close()
        except BaseException:
            placer.close()
            raise
        finally:
            for reader, _ in sources:
                if reader is not None:
                    reader.close()
        with self._lock:
            self._mms[placer.uffd] = Missing(placer.uffd, sorted(pieces))
        self.pids.add(pid)
        if self._server is None:
            with starting_threads("hpccr's page fault server"):
                self._server = threading.Thread(target=self._serve, name="faults", daemon=True)
                self._server.start()
        self._poke()

    def files(self, image) -> set[str]:
        """The names of `image`'s pages files read lazily (checked as they are streamed)."""
        return {name for owner, name in (reader.file for reader in self.sources)
                if owner is image}

    def finish(self) -> None:
        """Hold the job (self.tids) while the pages are streamed, then let it go (or sooner, if
        it ends)."""
        with starting_threads("hpccr's page streamer"):
            self._streamer = threading.Thread(target=self._stream, name="stream", daemon=True)
            self._streamer.start()
        _hold(self.tids, self._streamed_r, lambda: not self._streamed.is_set())

    def close(self) -> None:
        """Stop the threads; close the userfaultfds (which unregisters) and the sources."""
        with self._lock:
            self._stopping = True
        self._poke()
        for thread in (self._server, self._streamer):
            if thread is not None:
                thread.join()
        for uffd in [*self._mms, *self._retired]:
            os.close(uffd)
        self._mms.clear()
        self._retired.clear()
        for reader in self.sources:
            reader.close()
        for fd in (self._wake_r, self._wake_w, self._streamed_r, self._streamed_w):
            os.close(fd)

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _fail(self, what: str) -> None:
        """End this process: the kernel kills the processes it holds (PTRACE_O_EXITKILL),
        whose memory cannot be completed; nothing waits on it any more."""
        if self._stopping:
            return  # the job has ended: its pages are wanted no more
        if self.report >= 0:  # the restore is not done: the command says it
            with contextlib.suppress(OSError):
                os.write(self.report, f"RestoreFailed\tlazy restore: {what}".encode())
        else:
            print(f"hpccr: error: lazy restore: {what}: the restored job was killed (its "
                  "memory could not be completed; the image is unchanged)", file=sys.stderr,
                  flush=True)
        os._exit(RestoreFailed.exit_code)

    # The server thread: events first, then the faults.

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        polled: set[int] = set()
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    for uffd in self._mms.keys() - polled:
                        poller.register(uffd, select.POLLIN)
                    for uffd in polled - self._mms.keys():
                        poller.unregister(uffd)
                    polled = set(self._mms)
                    waiting = any(mm.faults for mm in self._mms.values())
                for fd, _ in poller.poll(EVENT_WAIT_S * 1000 if waiting else None):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 4096)
                    elif fd in polled:
                        self._read_events(self._mms.get(fd))
                for mm in list(self._mms.values()):
                    faults, mm.faults = mm.faults, []
                    for addr in faults:
                        self._place_fault(mm, addr)
        except Exception as exc:  # noqa: BLE001 - any: the job must not wait on a dead server
            self._fail(f"serving the job's page faults: {_describe(exc)}")

    def _read_events(self, mm: Missing | None) -> None:
        with self._lock:
            while mm is not None and mm.uffd in self._mms:
                try:
                    data = os.read(mm.uffd, UFFD_MSG.size * 64)
                except BlockingIOError:
                    break
                for offset in range(0, len(data), UFFD_MSG.size):
                    event, first, second, third = UFFD_MSG.unpack_from(data, offset)
                    if event == UFFD_EVENT_PAGEFAULT:  # (flags, address, thread)
                        mm.faults.append(second - second % PAGE)
                    elif event == UFFD_EVENT_FORK:  # (the child's userfaultfd)
                        child = first & 0xFFFFFFFF
                        self._mms[child] = Missing(child, list(mm.pieces))
                    elif event == UFFD_EVENT_REMAP:  # (from, to, length)
                        mm.move(first, second, third)
                    elif event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):  # (start, end)
                        mm.cut(first, second)
            self._lock.notify_all()

    def _place_fault(self, mm: Missing, addr: int) -> None:
        """Place the page at `addr` and those around it of its piece (the zero page if it is
        in none), then wake the threads waiting for it."""
        with self._lock:
            if mm.uffd not in self._mms:
                return
            found = mm.overlapping(addr, addr + PAGE)
            if not found:
                self._after(mm, addr, native.uffd_fill(mm.uffd, addr, None, PAGE)[0])
                return
            start, end, source, at = found[0]
            lo = max(start, addr - addr % FAULT_AROUND)
            hi = min(end, lo + FAULT_AROUND)
            offset = at + lo - start
        data = self.sources[source].read_at(offset, hi - lo)  # not under the lock: the disk
        with self._lock:
            for start, end, piece_source, at in mm.overlapping(lo, hi):
                if piece_source != source or at - start != offset - lo:
                    continue  # moved meanwhile
                start, end = max(start, lo), min(end, hi)
                ret, done = native.uffd_fill(mm.uffd, start, memoryview(data)[start - lo:],
                                             end - start)
                mm.cut(start, start + done)
                if ret:
                    self._after(mm, addr, ret)
                    return
            self._after(mm, addr, 0)

    def _after(self, mm: Missing, addr: int, ret: int) -> None:
        """Act on what placing for a fault at `addr` returned (under the lock)."""
        if ret == -errno.EAGAIN:
            mm.faults.append(addr)  # once the event that refused it is read
            return
        if ret == -errno.ESRCH:
            self._retire(mm)
            return
        if ret and ret != -errno.ENOENT:  # ENOENT: unmapped meanwhile, the fault is the job's
            raise OSError(-ret, f"placing the page at {addr:#x}: {os.strerror(-ret)}")
        with contextlib.suppress(OSError):
            uffd_ioctl(mm.uffd, UFFDIO_WAKE, addr, PAGE)  # if it was in place already

    def _retire(self, mm: Missing) -> None:
        """The mm is gone (its process exited or exec'd): its pages are wanted no more."""
        del self._mms[mm.uffd]
        self._retired.append(mm.uffd)

    # The streamer thread.

    def _stream(self) -> None:
        faults.pause("lazy-stream")
        try:
            for number, reader in enumerate(self.sources):
                self._stream_source(number, reader)
        except Exception as exc:  # noqa: BLE001 - any: the job's memory cannot be completed
            self._fail(f"streaming the pages: {_describe(exc)}")
        self._streamed.set()
        os.write(self._streamed_w, b"\0")

    def _stream_source(self, number: int, reader) -> None:
        """Read pages file `number` through (all of it: it is checked on the way, even if the
        faults placed every page) and place what is still missing."""
        with self._lock:
            wanted = union([], [(at, at + end - start) for mm in self._mms.values()
                                for start, end, source, at in mm.pieces if source == number])
        limit = reader.batch_limit
        pieces = [(at, min(limit, end - at)) for start, end in wanted
                  for at in range(start, end, limit)]
        chunks = reader.chunks(pieces, STREAM_HELD)
        try:
            for (at, _), chunk in zip(pieces, chunks, strict=True):
                if self._stopping:
                    return  # the job has ended
                self._place_chunk(number, at, chunk)
        finally:
            chunks.close()

    def _place_chunk(self, number: int, at: int, chunk: memoryview) -> None:
        """Place the bytes of pages file `number` at `at` wherever an mm still misses them."""
        end = at + len(chunk)
        with self._lock:
            while not self._stopping:
                refused = False
                for mm in list(self._mms.values()):
                    for start, stop, source, offset in list(mm.pieces):
                        if source != number or offset >= end or offset + stop - start <= at:
                            continue
                        first, last = max(offset, at), min(offset + stop - start, end)
                        dst = start + first - offset
                        ret, done = native.uffd_fill(mm.uffd, dst, chunk[first - at:last - at],
                                                     last - first)
                        mm.cut(dst, dst + done)
                        if ret == -errno.EAGAIN:  # an event to read first
                            refused = True
                            break
                        if ret == -errno.ESRCH:
                            self._retire(mm)
                            break
                        if ret == -errno.ENOENT:  # no longer registered: unmapped meanwhile
                            mm.cut(dst, dst + last - first)
                        elif ret:
                            raise OSError(-ret, f"placing pages at {dst:#x}: "
                                                f"{os.strerror(-ret)}")
                if not refused:
                    return
                self._lock.wait(EVENT_WAIT_S)


def _pieces(spans, runs, number: int) -> list[tuple[int, int, int, int]]:
    """`spans` (inside the `runs` of pages file `number`) as pieces (start, end, number,
    offset), one per run they cross."""
    starts = [vaddr for vaddr, _, _ in runs]
    out = []
    for lo, hi in spans:
        i = bisect.bisect_right(starts, lo) - 1
        while lo < hi:
            vaddr, nr, offset = runs[i]
            end = min(hi, vaddr + nr * PAGE)
            out.append((lo, end, number, offset + lo - vaddr))
            lo, i = end, i + 1
    return out


def _write_now(pid: int, reader, runs, spans) -> None:
    """Write the pages of `spans` by process_vm_writev, before the process runs."""
    new = native.ffi.new
    for start, end, _, offset in _pieces(spans, runs, 0):
        for addr in range(start, end, WRITE_BATCH):
            length = min(WRITE_BATCH, end - addr)
            data = reader.read_at(offset + addr - start, length)
            native.write_ranges(pid, new("unsigned long long[]", [addr]),
                                new("unsigned long long[]", [length]), 1, data)


def _hold(tids: list[int], done: int, busy) -> None:
    """Keep the threads `tids` traced (and those they make, PTRACE_O_TRACECLONE/FORK) while
    they run as if untraced, as long as `busy()` (checked when `done` is readable); then detach
    them all."""
    held = _Held(tids)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    previous = signal.signal(signal.SIGCHLD, lambda *_: None)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    try:
        while held.traced:
            if not held.detaching and not busy():
                held.detach_all()
            while True:
                try:
                    tid, status = os.waitpid(-1, native.WALL | os.WNOHANG)
                except ChildProcessError:
                    return  # nothing traced any more
                if not tid:
                    break
                held.stopped(tid, status)
            if held.traced:
                select.select([wake_r, done], [], [])
                for fd in (wake_r, done):
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 4096)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGCHLD, previous)
        os.close(wake_r)
        os.close(wake_w)


class _Held:
    """The threads traced by _hold(), and what it does at each of their stops."""

    def __init__(self, tids: list[int]):
        self.traced = set(tids)
        self.gone: set[int] = set()  # ended or detached
        self.detaching = False

    def detach_all(self) -> None:
        """Interrupt every thread: each is detached at its next stop."""
        self.detaching = True
        for tid in list(self.traced):
            try:
                native.interrupt(tid)
            except ProcessLookupError:
                self._gone(tid)  # ended (a thread of a process that exec'd)

    def stopped(self, tid: int, status: int) -> None:
        """Pass a thread's stop on as if it were not traced (or detach it)."""
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._gone(tid)
            return
        if not os.WIFSTOPPED(status):
            return
        self.traced.add(tid)  # a new one reports its first stop
        sig, event = os.WSTOPSIG(status), status >> 16
        delivered = sig if event == 0 else 0  # a signal on its way to the thread: passed on
        try:
            if event in NEW_TASK_EVENTS:
                new = native.event_message(tid)  # traced already: waited for, even if its
                if new not in self.gone:         # maker is detached first
                    self.traced.add(new)
            if self.detaching:
                native.detach(tid, delivered)
                self._gone(tid)
            elif event == native.PTRACE_EVENT_STOP and sig in GROUP_STOPS:
                native.listen(tid)  # stopped like its process, until a SIGCONT
            else:
                native.cont(tid, delivered)
        except ProcessLookupError:
            self._gone(tid)  # killed meanwhile

    def _gone(self, tid: int) -> None:
        self.traced.discard(tid)
        self.gone.add(tid)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HpccrError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return "".join(traceback.format_exception_only(exc)).strip()


def restore_detached(directory: str, user, tcp_close: bool, part) -> int:
    """Restore the image lazily in a process of its own, the filler, which goes on placing its
    pages after this returns the restored root's pid (once the job runs); the restore's error
    if it fails."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    filler = os.fork()
    if filler == 0:
        os.close(rd)
        _fill(directory, user, tcp_close, part, wr)
    os.close(wr)
    with os.fdopen(rd, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    kind, _, message = report.partition("\t")
    if kind == "running":
        return int(message)
    os.waitpid(filler, 0)
    error, message = errors.from_report(report)
    raise error or RestoreFailed(f"the lazy restore failed: {message or 'its process died'}")


def _fill(directory: str, user, tcp_close: bool, part, report: int):
    """The filler: restore, report the root's pid on `report`, place the pages; never returns."""
    from hpccr.engine.restore import restore_tree

    code = 1
    pages = LazyPages()
    pages.report = report
    try:
        root, network = restore_tree(directory, user, tcp_close, part, lazy=pages)
        if network is not None:
            network.release()  # the job holds it; lift_stale removes it after the job
        for sig in UNSTOPPABLE:  # the user's ^C or hangup is the command's, which has returned
            signal.signal(sig, lambda *_: None)
        with contextlib.suppress(BrokenPipeError):  # the command was killed: the job runs on
            os.write(report, f"running\t{root}".encode())
        os.close(report)
        report = pages.report = -1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # a caller reading the command's output gets its end now
        os.close(devnull)
        pages.finish()
        code = 0
    except HpccrError as exc:
        if report >= 0:
            os.write(report, f"{type(exc).__name__}\t{exc}".encode())
        else:
            print(f"hpccr: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:  # ^C before the job ran: the command says it
        code = 130
    except BaseException:  # noqa: BLE001 - its traceback, then the command's error
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            pages.close()
        os._exit(code)
