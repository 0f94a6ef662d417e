"""Memory pages of one process: ``pages-<pid>.img`` and its index ``pagemap-<pid>.bin``.

An incremental image (engine/tracking.py) also has ``inherited-<pid>.bin``: the page runs, in
the same records, that the process had at the checkpoint but that its parent image holds (in its
own pages, or inherited in turn); image/chain.py resolves them.  A process forked from another of
the image may have ``forked-<pid>.bin``: the page runs it still shared with its parent since the
fork (the same pages, copy-on-write), which the image saves once, with the parent's.

A compressed image has ``pages-<pid>.img.zst`` instead: the same bytes as one zstd stream,
compressed on all cores as they are written and decompressed batch by batch at restore, so
that neither side holds more than a few batches in memory."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import xxhash

from hpccr.errors import ImageCorrupt, starting_threads
from hpccr.image.store import PAGE_SIZE, ImageReader, ImageWriter, set_direct

_RECORD = struct.Struct("<QQ")
_ADDRESS_LIMIT = 1 << 64
ZSTD = ".zst"  # the suffix of a compressed pages file
ZSTD_LEVEL = 3  # zstd's default: about 1 GB/s per core on random-looking data
# The most bytes of the file one piece of chunks() spans: out of the page cache (a mapping),
# read through (direct I/O into buffers used in turn: their fresh memory is paid once) or
# decompressed (small buffers, touched early).
MAPPED_BATCH = 64 << 20
READ_THROUGH_BATCH = 16 << 20
DECOMPRESSED_BATCH = 4 << 20


def pages_name(pid: int) -> str:
    return f"pages-{pid}.img"


def pagemap_name(pid: int) -> str:
    return f"pagemap-{pid}.bin"


def inherited_name(pid: int) -> str:
    return f"inherited-{pid}.bin"


def forked_name(pid: int) -> str:
    return f"forked-{pid}.bin"


def page_buffers(count: int, size: int, what: str) -> list[mmap.mmap]:
    """`count` anonymous mappings of `size` bytes (page-aligned, as direct I/O wants them);
    an OSError that names them ("hpccr's `what` buffers") if they cannot all be had."""
    buffers: list[mmap.mmap] = []
    try:
        for _ in range(count):
            buffers.append(mmap.mmap(-1, size))
    except OSError as exc:
        for buf in buffers:
            buf.close()
        raise OSError(exc.errno, f"allocating hpccr's {what} buffers ({size >> 20} MiB each): "
                                 f"{os.strerror(exc.errno)}") from None
    return buffers


def is_pages(name: str) -> bool:
    """Whether `name` is an uncompressed pages file (those a restore reads through)."""
    return name.startswith("pages-") and name.endswith(".img")


def pack_runs(spans) -> bytes:
    """(start, end) address spans as pagemap records."""
    return b"".join(_RECORD.pack(start, (end - start) // PAGE_SIZE) for start, end in spans)


def parse_runs(index: bytes, name: str) -> list[tuple[int, int, int]]:
    """The runs (vaddr, nr_pages, offset) of pagemap records; ImageCorrupt if they are not
    page-aligned, disjoint runs."""
    if len(index) % _RECORD.size:
        raise ImageCorrupt(f"{name}: truncated record (image corrupted)")
    runs = []
    offset = 0
    for vaddr, nr in _RECORD.iter_unpack(index):
        end = vaddr + nr * PAGE_SIZE
        if vaddr % PAGE_SIZE or nr == 0 or end > _ADDRESS_LIMIT:
            raise ImageCorrupt(f"{name}: invalid run {vaddr:#x} x {nr} pages (image corrupted)")
        runs.append((vaddr, nr, offset))
        offset += nr * PAGE_SIZE
    overlap = _first_overlap(runs)
    if overlap:
        raise ImageCorrupt(f"{name}: runs at {overlap[0]:#x} and {overlap[1]:#x} overlap "
                           "(image corrupted)")
    return runs


def spans_of(runs) -> list[tuple[int, int]]:
    """The sorted (start, end) address spans of runs."""
    return sorted((vaddr, vaddr + nr * PAGE_SIZE) for vaddr, nr, *_ in runs)


def _first_overlap(runs) -> tuple[int, int] | None:
    """The first pair of (vaddr, nr_pages) runs, in address order, that share a page."""
    end = 0
    for vaddr, nr, *_ in runs:  # in address order, as hpccr writes them: disjoint, no sort
        if vaddr < end:
            break
        end = vaddr + nr * PAGE_SIZE
    else:
        return None
    ordered = sorted((vaddr, nr) for vaddr, nr, *_ in runs)
    for (a, an), (b, _) in zip(ordered, ordered[1:], strict=False):
        if a + an * PAGE_SIZE > b:
            return a, b
    return None


class PageWriter:
    """Streams page runs into the image; only the small index is kept in memory."""

    def __init__(self, writer: ImageWriter, pid: int, compress: bool = False,
                 direct: bool = True):
        self._writer = writer
        self._pid = pid
        self._file = writer.open_stream(pages_name(pid) + (ZSTD if compress else ""),
                                        direct=direct and not compress)
        self._stream = self._file
        if compress:
            import zstandard  # only when asked: its import is not free

            self._stream = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).stream_writer(
                self._file, closefd=False)
        self._runs: list[list[int]] = []  # [vaddr, nr_pages]
        self.nr_pages = 0

    def write_run(self, vaddr: int, data) -> None:
        """Append the pages at ``vaddr``; ``data`` (any buffer) is written without a copy."""
        self.write_runs([(vaddr, memoryview(data).nbytes)], data)

    def write_runs(self, runs: list[tuple[int, int]], data) -> None:
        """Append the pages of ``runs`` ((address, length) pairs), whose bytes ``data`` (any
        buffer) holds back to back: one write however many runs (a sparse incremental
        checkpoint has one per page)."""
        total = 0
        for vaddr, size in runs:
            if vaddr % PAGE_SIZE or size % PAGE_SIZE or vaddr + size > _ADDRESS_LIMIT:
                raise ValueError(f"page run {vaddr:#x}+{size:#x} is not page aligned")
            total += size
        if total != memoryview(data).nbytes:
            raise ValueError(f"{total} bytes of page runs, {memoryview(data).nbytes} given")
        if not total:
            return
        self._stream.write(data)
        for vaddr, size in runs:
            if not size:
                continue
            nr = size // PAGE_SIZE
            last = self._runs[-1] if self._runs else None
            if last and last[0] + last[1] * PAGE_SIZE == vaddr:
                last[1] += nr
            else:
                self._runs.append([vaddr, nr])
        self.nr_pages += total // PAGE_SIZE

    def close(self) -> None:
        """Finish the pages file and write the pagemap; required before ImageWriter.commit()."""
        if self._file.closed:
            return
        overlap = _first_overlap(self._runs)
        if overlap:
            raise ValueError(f"pid {self._pid}: page runs at {overlap[0]:#x} and "
                             f"{overlap[1]:#x} overlap")
        if self._stream is not self._file:
            self._stream.close()  # the end of the zstd frame; the file stays open
        self._file.close()
        index = b"".join(_RECORD.pack(vaddr, nr) for vaddr, nr in self._runs)
        self._writer.write_bytes(pagemap_name(self._pid), index)

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.discard()


class PageReader:
    """The validated page index of one process and zero-copy access to its pages."""

    def __init__(self, reader: ImageReader, pid: int):
        self._pid = pid
        self._image = reader
        index = reader.read_bytes(pagemap_name(pid))
        self.compressed = pages_name(pid) + ZSTD in reader.files
        self._name = pages_name(pid) + (ZSTD if self.compressed else "")
        self._fd = reader.open_file(self._name)
        self._random_fd = -1  # read_at()'s
        self._map: mmap.mmap | None = None
        try:
            self.runs, self.size = self._parse(index)  # size: of the pages, uncompressed
            name = inherited_name(pid)
            self.inherited = (spans_of(parse_runs(reader.read_bytes(name), name))
                              if name in reader.files else [])  # in the parent (chain.py)
            stored = os.fstat(self._fd).st_size
            if not self.compressed and stored != self.size:
                raise ImageCorrupt(f"{self._name}: {stored} bytes but the pagemap lists "
                                   f"{self.size} (image corrupted)")
        except BaseException:
            self.close()
            raise

    def _parse(self, index: bytes) -> tuple[list[tuple[int, int, int]], int]:
        """The runs (vaddr, nr_pages, offset) and the bytes they add up to."""
        runs = parse_runs(index, pagemap_name(self._pid))
        return runs, (runs[-1][2] + runs[-1][1] * PAGE_SIZE if runs else 0)

    @property
    def file(self) -> tuple[ImageReader, str]:
        """The image and the name of the file the pages are read from."""
        return self._image, self._name

    @property
    def nr_pages(self) -> int:
        return self.size // PAGE_SIZE

    def chunks(self, pieces: list[tuple[int, int]], held: int):
        """The pages at these (offset, size) pieces of the pages, in increasing offset order,
        as buffers: slices of a mapping of the file (straight out of the page cache), or,
        compressed, decompressed one by one into `held` + 1 buffers in turn (the caller holds
        no more than `held` chunks while it asks for the next).  A chunk of the mapping that
        the caller no longer holds leaves it (MADV_DONTNEED: the page cache keeps the pages),
        so that this process's resident set stays within `held` + 1 chunks, not the file."""
        if self.compressed:
            yield from self._decompressed(pieces, held + 1)
            return
        if not self.size:
            return
        if self._image.deferred(self._name):
            yield from self._read_through(pieces, held)
            return
        self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
        self._map.madvise(mmap.MADV_SEQUENTIAL)  # large read-ahead: the pieces come in order
        used: deque[tuple[int, int]] = deque()
        with memoryview(self._map) as view:
            for offset, size in pieces:
                while len(used) > held:
                    start, end = used.popleft()
                    self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
                yield view[offset:offset + size]
                used.append((offset - offset % PAGE_SIZE, offset + size))

    @property
    def batch_limit(self) -> int:
        """The most bytes of the file a piece asked of chunks() should span."""
        if self.compressed:
            return DECOMPRESSED_BATCH
        return READ_THROUGH_BATCH if self._image.deferred(self._name) else MAPPED_BATCH

    def _read_through(self, pieces: list[tuple[int, int]], held: int):
        """chunks() of a file whose check was deferred (ImageReader.verify): the whole file is
        read in order by a thread of its own, one piece ahead, with direct I/O where the file
        system has it (no page cache: the disk's bandwidth, without the fresh memory of a
        cache), and hashed on the way; the checksum is compared after the last piece
        (ImageCorrupt), before the caller trusts what it wrote.  The caller holds `held`
        pieces at most while it asks for the next."""
        direct = set_direct(self._fd, True)
        # Used in turn: the caller's, the one it is given next, the one read meanwhile.
        each = max([size for _, size in pieces] + [min(READ_THROUGH_BATCH, self.size)])
        buffers = page_buffers(min(held + 2, len(pieces) + 1), each, "read")
        hasher = xxhash.xxh3_128()

        def fill(view: memoryview, at: int) -> None:
            nonlocal direct
            done = 0
            while done < len(view):
                try:
                    got = os.preadv(self._fd, [view[done:]], at + done)
                except OSError as exc:
                    if not direct or exc.errno != errno.EINVAL:
                        raise
                    direct = set_direct(self._fd, False)  # refused: not aligned for the disk
                    continue
                if not got:
                    raise ImageCorrupt(f"{self._name}: truncated while it was read")
                done += got
            hasher.update(view)

        position = 0

        def read(number: int, offset: int, size: int) -> memoryview | None:
            nonlocal position
            buf = buffers[number % len(buffers)]
            with memoryview(buf) as whole:
                while position < offset:  # bytes not asked for: hashed only
                    skip = min(offset - position, len(buf))
                    fill(whole[:skip], position)
                    position += skip
            if not size:
                return None
            chunk = memoryview(buf)[:size]
            fill(chunk, offset)
            position += size
            return chunk

        try:
            with starting_threads("hpccr's reader thread"), ThreadPoolExecutor(1) as reader:
                ahead: deque = deque()
                for number, piece in enumerate([*pieces, (self.size, 0)]):
                    ahead.append(reader.submit(read, number, *piece))
                    if len(ahead) == 2 and (chunk := ahead.popleft().result()) is not None:
                        yield chunk
                if (chunk := ahead.popleft().result()) is not None:
                    yield chunk
            self._image.confirm(self._name, self._fd, hasher.hexdigest())
        finally:
            for buf in buffers:
                with contextlib.suppress(BufferError):  # a view still held: the GC unmaps it
                    buf.close()

    def _decompressed(self, pieces: list[tuple[int, int]], nr_buffers: int):
        import zstandard

        buffers: list[bytearray] = []  # reused: fresh memory costs a page fault per page
        largest = max((size for _, size in pieces), default=0)
        with open(self._fd, "rb", closefd=False) as raw, \
                zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20) as stream:
            def fill(chunk: memoryview) -> None:
                done = 0
                while done < len(chunk):
                    got = stream.readinto(chunk[done:])
                    if not got:
                        raise ImageCorrupt(f"{self._name}: {self.size} bytes of pages "
                                           "listed, fewer stored (image corrupted)")
                    done += got

            try:
                position = 0
                for i, (offset, size) in enumerate([*pieces, (self.size, 0)]):
                    if len(buffers) < nr_buffers:
                        buffers.append(bytearray(max(largest, 1 << 20)))
                    while position < offset:  # pages not asked for: read past them
                        skip = min(offset - position, len(buffers[0]))
                        fill(memoryview(buffers[i % len(buffers)])[:skip])
                        position += skip
                    if size:
                        chunk = memoryview(buffers[i % nr_buffers])[:size]
                        fill(chunk)
                        position += size
                        yield chunk
                extra = stream.read(1)
            except zstandard.ZstdError as exc:
                raise ImageCorrupt(f"{self._name}: {exc} (image corrupted)") from None
            if extra:
                raise ImageCorrupt(f"{self._name}: more pages stored than the pagemap lists "
                                   "(image corrupted)")

    def read_at(self, offset: int, size: int) -> bytes:
        """`size` bytes of the (uncompressed) pages at `offset`, through the page cache, not
        checked: for a lazy restore, whose pages are checked as chunks() reads them through."""
        if self._random_fd < 0:  # its own open file: chunks() may set O_DIRECT on the other
            self._random_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(self._random_fd, size, offset)
        if len(data) != size:
            raise ImageCorrupt(f"{self._name}: truncated while it was read")
        return data

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._random_fd >= 0:
            os.close(self._random_fd)
            self._random_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
