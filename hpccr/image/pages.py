"""Memory pages of one process: ``pages-<pid>.img`` and its index ``pagemap-<pid>.bin``."""

from __future__ import annotations

import mmap
import os
import struct

from hpccr.errors import ImageCorrupt
from hpccr.image.store import PAGE_SIZE, ImageReader, ImageWriter

_RECORD = struct.Struct("<QQ")
_ADDRESS_LIMIT = 1 << 64


def pages_name(pid: int) -> str:
    return f"pages-{pid}.img"


def pagemap_name(pid: int) -> str:
    return f"pagemap-{pid}.bin"


def _first_overlap(runs) -> tuple[int, int] | None:
    """The first pair of (vaddr, nr_pages) runs, in address order, that share a page."""
    ordered = sorted((vaddr, nr) for vaddr, nr, *_ in runs)
    for (a, an), (b, _) in zip(ordered, ordered[1:], strict=False):
        if a + an * PAGE_SIZE > b:
            return a, b
    return None


class PageWriter:
    """Streams page runs into the image; only the small index is kept in memory."""

    def __init__(self, writer: ImageWriter, pid: int):
        self._writer = writer
        self._pid = pid
        self._stream = writer.open_stream(pages_name(pid))
        self._runs: list[list[int]] = []  # [vaddr, nr_pages]
        self.nr_pages = 0

    def write_run(self, vaddr: int, data) -> None:
        """Append the pages at ``vaddr``; ``data`` (any buffer) is written without a copy."""
        size = memoryview(data).nbytes
        if vaddr % PAGE_SIZE or size % PAGE_SIZE or vaddr + size > _ADDRESS_LIMIT:
            raise ValueError(f"page run {vaddr:#x}+{size:#x} is not page aligned")
        if not size:
            return
        self._stream.write(data)
        nr = size // PAGE_SIZE
        last = self._runs[-1] if self._runs else None
        if last and last[0] + last[1] * PAGE_SIZE == vaddr:
            last[1] += nr
        else:
            self._runs.append([vaddr, nr])
        self.nr_pages += nr

    def close(self) -> None:
        """Finish the pages file and write the pagemap; required before ImageWriter.commit()."""
        if self._stream.closed:
            return
        overlap = _first_overlap(self._runs)
        if overlap:
            raise ValueError(f"pid {self._pid}: page runs at {overlap[0]:#x} and "
                             f"{overlap[1]:#x} overlap")
        self._stream.close()
        index = b"".join(_RECORD.pack(vaddr, nr) for vaddr, nr in self._runs)
        self._writer.write_bytes(pagemap_name(self._pid), index)

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stream.discard()


class PageReader:
    """The validated page index of one process and zero-copy access to its pages."""

    def __init__(self, reader: ImageReader, pid: int):
        self._pid = pid
        index = reader.read_bytes(pagemap_name(pid))
        self._fd = reader.open_file(pages_name(pid))
        self._map: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._fd).st_size
            self.runs = self._parse(index)
        except BaseException:
            self.close()
            raise

    def _parse(self, index: bytes) -> list[tuple[int, int, int]]:
        name = pagemap_name(self._pid)
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
        if offset != self.size:
            raise ImageCorrupt(f"{pages_name(self._pid)}: {self.size} bytes but the pagemap "
                               f"lists {offset} (image corrupted)")
        return runs

    @property
    def nr_pages(self) -> int:
        return self.size // PAGE_SIZE

    def mmap(self) -> mmap.mmap | None:
        """A read-only mapping of the whole pages file (None if it is empty); closed by close()."""
        if self._map is None and self.size:
            self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
