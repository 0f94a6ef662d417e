"""Ghost files: regular files that were deleted while a process still had them open or mapped.
Their content goes into the image; at restore they are recreated in a private directory, opened
by the restored process, and unlinked again once every opener has them.

A saved file is its data only: ``ghost-<n>.img`` holds the bytes of its data extents, one after
the other (found with SEEK_DATA/SEEK_HOLE), and ``ghost-<n>.img.extents`` its size, the extents
and its owner, ``{"size": <int>, "extents": [[offset, length], ...], "owner": [uid, gid]}``: a
sparse file costs what its data costs, and comes back sparse, with its holes where they were."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile

from hpccr.errors import ImageCorrupt

COPY_CHUNK = 8 << 20
EXTENTS = ".extents"  # the suffix of a saved file's extents


def _data_extents(fd: int, size: int) -> list[list[int]]:
    """[offset, length] of each run of data of the file (holes left out)."""
    extents, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            extents.append([start, end - start])
        offset = end
    return extents


def layout(text: bytes, data_size: int) -> tuple[int, list[list[int]], list[int]]:
    """The size, extents and owner of a saved file, checked (images are untrusted input):
    extents in order, apart, inside the size, adding up to the `data_size` bytes saved."""
    try:
        saved = json.loads(text)
        size, extents, owner = saved["size"], saved["extents"], saved["owner"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise ImageCorrupt("a saved file's extents are malformed (image corrupted)") from None
    end = 0
    ok = type(size) is int and size >= 0 and isinstance(extents, list) and \
        isinstance(owner, list) and len(owner) == 2 and \
        all(type(n) is int and 0 <= n < 1 << 32 for n in owner)
    for extent in extents if ok else ():
        if not (isinstance(extent, list) and len(extent) == 2
                and all(type(n) is int for n in extent)
                and extent[0] >= end and extent[1] > 0 and extent[0] + extent[1] <= size):
            ok = False
            break
        end = extent[0] + extent[1]
    if not ok or sum(length for _, length in extents) != data_size:
        raise ImageCorrupt("a saved file's extents do not fit its data (image corrupted)")
    return size, extents, owner


def fill(out: int, data: int, text: bytes) -> list[int]:
    """Write a saved file (its data at descriptor `data`, its extents `text`) into `out`,
    holes as holes; returns its owner [uid, gid]."""
    size, extents, owner = layout(text, os.fstat(data).st_size)
    os.ftruncate(out, size)
    for offset, length in extents:
        os.lseek(out, offset, os.SEEK_SET)
        while length:
            sent = os.sendfile(out, data, None, min(length, COPY_CHUNK))
            if not sent:
                raise ImageCorrupt("a saved file ends early (image corrupted)")
            length -= sent
    return owner


class GhostWriter:
    """Dump side: one image file per deleted inode, however many descriptors or VMAs use it."""

    def __init__(self, writer):
        self.writer = writer
        self.saved: dict[tuple[int, int], str] = {}

    def save(self, path: str, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino)
        if key not in self.saved:
            name = f"ghost-{len(self.saved)}.img"
            with open(path, "rb") as src, self.writer.open_stream(name) as out:
                size = os.fstat(src.fileno()).st_size
                extents = _data_extents(src.fileno(), size)
                for offset, length in extents:
                    while length:
                        chunk = os.pread(src.fileno(), min(length, COPY_CHUNK), offset)
                        if not chunk:
                            raise OSError(errno.EIO, f"{path} shrank while it was saved")
                        out.write(chunk)
                        offset += len(chunk)
                        length -= len(chunk)
            self.writer.write_json(name + EXTENTS, {"size": size, "extents": extents,
                                                    "owner": [st.st_uid, st.st_gid]})
            self.saved[key] = name
        return self.saved[key]


class GhostFiles:
    """Restore side: materialise ghost files for the restored process, owned by its user.

    A ghost is readable and writable by its owner until every opener has it: the process held
    it open with its own mode (O_RDWR, say) whatever mode the file had by the dump (fchmod'ed
    to 0 after it was opened, say).  Its saved mode comes back just before it is unlinked, and
    its saved owner too, for an image only root could have written (`trusted`): a user's image
    could claim any owner for content of its own (a setuid root file, say)."""

    def __init__(self, reader, uid: int, gid: int, trusted: bool = False):
        self.reader = reader
        self.uid, self.gid = uid, gid
        self.trusted = trusted
        self.dir: str | None = None
        self.paths: dict[str, str] = {}
        self.modes: dict[str, int] = {}  # name -> the permission bits it had at the dump
        self.owners: dict[str, list[int]] = {}  # name -> its [uid, gid] at the dump

    def path(self, name: str, mode: int | None) -> str:
        """Where ghost `name` is, made on first use; `mode`: its st_mode at the dump, None if
        not known (a mapping's)."""
        if name not in self.paths:
            self._make_dir()
            dest = os.path.join(self.dir, name)
            self.owners[name] = write_saved(self.reader, name, dest)
            os.chown(dest, self.uid, self.gid)
            os.chmod(dest, stat.S_IRUSR | stat.S_IWUSR)
            self.paths[name] = dest
        if mode is not None:
            self.modes[name] = stat.S_IMODE(mode)
        return self.paths[name]

    def unnamed(self, name: str, directory: str, flags: int, mode: int) -> int:
        """Ghost `name` made again as a file without a name in `directory` (O_TMPFILE: one
        that may still be given a name there, linkat), opened with `flags` (writable); OSError
        where that cannot be (the directory gone, a file system without O_TMPFILE)."""
        fd = os.open(directory, flags | os.O_TMPFILE, stat.S_IMODE(mode))
        try:
            data = self.reader.open_file(name)
            try:
                fill(fd, data, self.reader.read_bytes(name + EXTENTS))
            finally:
                os.close(data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def directory(self) -> str:
        """An empty directory of the process's owner: a working directory or a directory
        descriptor deleted since comes back as one, deleted in turn before the process runs."""
        self._make_dir()
        path = tempfile.mkdtemp(prefix="dir-", dir=self.dir)
        os.chown(path, self.uid, self.gid)
        return path

    def executable(self, name: str) -> str:
        """Ghost `name` as the process's executable (the kernel sets only one it may run)."""
        path = self.path(name, None)
        os.chmod(path, stat.S_IRWXU)
        return path

    def _make_dir(self) -> None:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="hpccr-ghosts-", dir=_executable_tmp())
            os.chmod(self.dir, 0o711)

    def unlink_all(self) -> None:
        if self.dir:
            for name, path in self.paths.items():
                if self.trusted:
                    os.chown(path, *self.owners[name])
                if name in self.modes:
                    os.chmod(path, self.modes[name])
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _executable_tmp() -> str:
    """A temporary directory whose file system lets programs run: a ghost may be a deleted
    program or library that the process maps to execute, and /tmp is often mounted noexec on
    compute nodes (the mapping would be refused)."""
    candidates = [tempfile.gettempdir(), "/var/tmp", "/dev/shm"]
    for directory in candidates:
        try:
            if not os.statvfs(directory).f_flag & os.ST_NOEXEC:
                return directory
        except OSError:
            continue
    return candidates[0]


class SharedObjects:
    """Restore side, for all the processes at once: shared memory objects recreated on tmpfs,
    one per saved object, which every process that mapped it maps again (so they share it); and
    files of memory-backed file systems (POSIX shared memory) written back at their path with
    the content they had at the checkpoint."""

    def __init__(self, reader):
        self.reader = reader
        self.dir: str | None = None
        self.paths: dict[str, str] = {}
        self.put: set[str] = set()
        self.held: dict[str, str] = {}

    def hold(self, name: str, path: str) -> None:
        """Object `name` was remade as a descriptor that a restored process holds, reachable
        through `path` (a memfd): its mappings map that object, not a copy."""
        self.held[name] = path

    def shmem(self, name: str) -> str:
        if name in self.held:
            return self.held[name]
        if name not in self.paths:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="hpccr-shmem-", dir="/dev/shm")
            dest = os.path.join(self.dir, name)
            self._copy(name, dest)
            self.paths[name] = dest
        return self.paths[name]

    def put_back(self, name: str, path: str) -> None:
        """Write object `name` back at `path`, making the directories it needs (with the caller's
        file rights: the restored process's)."""
        if path not in self.put:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._copy(name, path)
            self.put.add(path)

    def _copy(self, name: str, dest: str) -> None:
        write_saved(self.reader, name, dest)

    def unlink_all(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def write_saved(reader, name: str, dest: str) -> list[int]:
    """Saved file `name` of the image at `reader`, written to `dest` (made or emptied); returns
    its owner at the dump."""
    text = reader.read_bytes(name + EXTENTS)
    data = reader.open_file(name)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            return fill(out, data, text)
        finally:
            os.close(out)
    finally:
        os.close(data)
