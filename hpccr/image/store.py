"""Writing and reading image directories: atomic commit, checksums, verification.

The format is described in docs/image-format.md.  Writers stream every file through an xxh3-128
hasher, so committing never re-reads data; readers treat everything on disk as untrusted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import xxhash

from hpccr import faults
from hpccr.errors import (
    AccessDenied,
    ImageCorrupt,
    ImageNotFound,
    ImageWriteError,
    from_oserror,
    starting_threads,
)
from hpccr.image.schema import check_meta

FORMAT_VERSION = 1
PAGE_SIZE = 4096
CHECKSUMS = "checksums"
FSYNC_THREADS = 4  # files made durable at once by commit(): as fast as 16 here
META = "image.json"

_VERIFY_CHUNK = 8 << 20
_CHECKSUM_LINE = re.compile(r"xxh3-128 ([0-9a-f]{32})  ([0-9]+)  (.+)")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def valid_name(name: str) -> bool:
    """Image files are plain names inside the image directory: no paths, no hidden files."""
    return (
        bool(name)
        and name != CHECKSUMS
        and not name.startswith(".")
        and not any(c in name for c in "/\0\n")
    )


def _write_error(exc: OSError, image: Path, name: str | None = None) -> ImageWriteError:
    where = f"{image}: {name}" if name else str(image)
    return ImageWriteError(f"cannot write image {where}: {exc.strerror or exc}")


def _fsync(path: str | Path) -> None:
    """fsync a file or directory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> None:
    if _libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)


def _locked(path: Path, how: int) -> int:
    """A descriptor of directory `path` holding flock `how` (raises OSError if it cannot)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove_abandoned(parent: Path, name: str) -> None:
    """Remove the temporary directories of writers of image `name` that died (a killed dump):
    a live writer holds a lock on its own."""
    for entry in parent.glob(f".{glob.escape(name)}.partial-*"):
        try:
            fd = _locked(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer's, or gone meanwhile
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on (a file system without direct I/O,
    such as tmpfs before 6.6, refuses it: off)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return on


class StreamWriter:
    """One image file, written sequentially and hashed on the way through.

    `direct`: written with O_DIRECT, for the pages: straight from hpccr's buffers to the disk,
    without filling the page cache (whose fresh memory, in a VM, costs more than the disk's
    bandwidth, and which a job's node needs more than a checkpoint it will not read again)."""

    def __init__(self, image: Path, path: Path, on_close, direct: bool = False):
        self.name = path.name
        self.size = 0
        self._image = image
        self._hash = xxhash.xxh3_128()
        self._on_close = on_close
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _write_error(exc, image, self.name) from exc
        self._direct = direct and set_direct(self._fd, True)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, buf) -> None:
        """Write any buffer-protocol object (bytes, memoryview, cffi buffer) without copying it."""
        if self.closed:
            raise ValueError(f"{self.name}: write to a closed stream")
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        faults.point("write")
        self._hash.update(view)
        done = 0
        try:
            while done < len(view):
                try:
                    done += os.write(self._fd, view[done:])
                except OSError as exc:
                    if not self._direct or exc.errno != errno.EINVAL:
                        raise
                    # direct I/O refused a buffer, length or offset not aligned for the device
                    self._direct = set_direct(self._fd, False)
        except OSError as exc:
            raise _write_error(exc, self._image, self.name) from exc
        self.size += done

    def discard(self) -> None:
        """Close without fsync or recording a digest (the image is being thrown away)."""
        if not self.closed:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Close; the digest is handed to the ImageWriter for ``checksums``.  The fsync waits
        for commit(), so that a dump can release its process before the disk has caught up."""
        if self.closed:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        self._on_close(self.name, self._hash.hexdigest(), self.size)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class ImageWriter:
    """Builds an image in a temporary sibling directory and moves it into place on commit().

    Until commit() returns, whatever was at ``final_dir`` is untouched; on any failure the
    temporary directory is removed.  Used as a context manager, it aborts unless committed.
    """

    def __init__(self, final_dir: str | Path):
        self.final_dir = Path(os.path.abspath(final_dir))
        parent, name = self.final_dir.parent, self.final_dir.name
        if not name:
            raise ImageWriteError(f"cannot write image at {final_dir}: not a directory name")
        self._digests: dict[str, tuple[str, int]] = {}
        self._open: dict[str, StreamWriter] = {}
        self._done = False
        self._lock = -1
        try:
            os.makedirs(parent, exist_ok=True)
            self._tmp = parent / f".{name}.partial-{secrets.token_hex(4)}"
            os.mkdir(self._tmp, 0o700)
            self._lock = _locked(self._tmp, fcntl.LOCK_EX)
            self.dir_stat = os.fstat(self._lock)  # its owner is the image's: what it may restore
        except OSError as exc:
            raise _write_error(exc, self.final_dir) from exc
        _remove_abandoned(parent, name)

    def open_stream(self, name: str, direct: bool = False) -> StreamWriter:
        if not valid_name(name):
            raise ValueError(f"invalid image file name {name!r}")
        if name in self._digests or name in self._open:
            raise ValueError(f"image file {name} written twice")
        self._check_active()
        stream = StreamWriter(self.final_dir, self._tmp / name, self._stream_closed, direct)
        self._open[name] = stream
        return stream

    def _stream_closed(self, name: str, digest: str, size: int) -> None:
        del self._open[name]
        self._digests[name] = (digest, size)

    def write_bytes(self, name: str, data) -> None:
        with self.open_stream(name) as stream:
            stream.write(data)

    def write_json(self, name: str, obj) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        self.write_bytes(name, text.encode())

    def commit(self) -> Path:
        """Write ``checksums``, make everything durable and atomically replace ``final_dir``."""
        self._check_active()
        if self._open:
            raise ValueError(f"commit with unclosed image files: {', '.join(sorted(self._open))}")
        try:
            self._seal()
            self._place()
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.final_dir) from exc
        except ImageWriteError:
            self.abort()
            raise
        self._done = True
        self._unlock()
        return self.final_dir

    def _seal(self) -> None:
        """Write ``checksums``, then make it, every other file and the directory durable, a few
        at once: the file system commits them together (ext4: one journal commit rather than
        one per file; 6-20 files: 10-80 ms -> 1-8 ms here)."""
        lines = [
            f"xxh3-128 {digest}  {size}  {name}\n"
            for name, (digest, size) in sorted(self._digests.items())
        ]
        with StreamWriter(self.final_dir, self._tmp / CHECKSUMS, lambda *_: None) as stream:
            stream.write("".join(lines).encode())
        paths = [self._tmp, self._tmp / CHECKSUMS, *(self._tmp / name for name in self._digests)]
        try:
            with starting_threads("hpccr's fsync threads"), \
                    ThreadPoolExecutor(min(FSYNC_THREADS, len(paths))) as pool:
                for done in [pool.submit(_fsync, path) for path in paths]:
                    done.result()
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            for path in paths:  # no thread to be had (out of address space): in turn
                _fsync(path)

    def _place(self) -> None:
        final = self.final_dir
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            st = None
        if st is None or (stat.S_ISDIR(st.st_mode) and not os.listdir(final)):
            os.rename(self._tmp, final)
            _fsync(final.parent)
            return
        if not stat.S_ISDIR(st.st_mode) or not (
            os.path.lexists(final / CHECKSUMS) or os.path.lexists(final / META)
        ):
            raise ImageWriteError(f"refusing to overwrite {final}: not an hpccr image")
        try:
            _exchange(str(self._tmp), str(final))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise ImageWriteError(
                    f"cannot replace image {final}: the filesystem does not support "
                    "atomic exchange (renameat2 RENAME_EXCHANGE)"
                ) from exc
            raise
        self._done = True
        _fsync(final.parent)
        # The temporary name now holds the previous image.  The new one is already in place, so
        # failing to delete the old one only leaves a stale .partial directory behind.
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_active(self) -> None:
        if self._done:
            raise ValueError(f"image writer for {self.final_dir} already finished")

    def abort(self) -> None:
        """Discard everything written so far; idempotent, and a no-op after commit()."""
        if self._done:
            self._unlock()
            return
        self._done = True
        for stream in self._open.values():
            stream.discard()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file apart from another, or from itself rewritten (any write or link
    change moves the change time, which its owner cannot set back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns


class ImageFile(NamedTuple):
    name: str
    size: int
    digest: str


class ImageReader:
    """A checkpoint image on disk.  Call verify() before trusting any file's content.

    The directory is opened once, here, with the rights of the caller at that moment, and every
    file is opened relative to it: renaming or re-linking paths afterwards cannot make the
    reader read another directory.  Every file must be the directory owner's (a hard link to
    someone else's file is refused), and a file opened after verify() must be the very file
    verify() checked, unchanged since (same inode, size and change time): an image swapped or
    rewritten in the meantime is refused, not read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir_fd = -1
        self.parents: list[ImageReader] = []  # an incremental image's, once opened (chain.py)
        try:
            self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ImageNotFound(f"no checkpoint image at {path}") from None
        except OSError as exc:
            raise from_oserror(exc, f"reading {self.path}", ImageCorrupt) from exc
        self._meta = None
        self._owner = os.fstat(self.dir_fd).st_uid
        self._checked: dict[str, tuple[int, int, int, int]] = {}  # name -> identity at verify()
        self._deferred: dict[str, tuple[int, int, int, int]] = {}  # the same, content unchecked
        try:
            raw = self._read_checksums()
            self.digest = hashlib.sha256(raw).hexdigest()  # names the image (image/chain.py)
            self.files = self._parse_checksums(raw)
        except BaseException:
            self.close()
            raise

    def _read_checksums(self) -> bytes:
        try:
            return self._read_file(CHECKSUMS)
        except FileNotFoundError:
            if not _lexists(META, self.dir_fd):
                raise ImageNotFound(f"no checkpoint image at {self.path}") from None
            raise ImageCorrupt(f"{self.path}: checksums missing (image corrupted)") from None
        except OSError as exc:
            raise from_oserror(exc, f"reading {self.path / CHECKSUMS}", ImageCorrupt) from exc

    def close(self) -> None:
        for parent in self.parents:
            parent.close()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __del__(self) -> None:
        self.close()

    def _parse_checksums(self, raw: bytes) -> dict[str, ImageFile]:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ImageCorrupt(f"{self.path}: checksums is not UTF-8 text") from None
        if text and not text.endswith("\n"):
            raise ImageCorrupt(f"{self.path}: checksums is truncated")
        files: dict[str, ImageFile] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            m = _CHECKSUM_LINE.fullmatch(line)
            if not m or not valid_name(m[3]) or m[3] in files:
                raise ImageCorrupt(f"{self.path}: checksums line {lineno} is malformed")
            files[m[3]] = ImageFile(m[3], int(m[2]), m[1])
        return files

    def _open(self, name: str) -> int:
        """Open an image file for reading: a regular file, not a symlink, the image owner's,
        and the file verify() checked if it checked one by that name."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ImageCorrupt(f"{name}: not a regular file") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageCorrupt(f"{name}: not a regular file")
            if st.st_uid != self._owner:
                raise AccessDenied(f"{self.path}: {name} belongs to uid {st.st_uid}, not to "
                                   f"the image's owner (uid {self._owner}): refused")
            checked = self._checked.get(name, self._deferred.get(name))
            if checked is not None and checked != _identity(st):
                raise ImageCorrupt(f"{self.path}: {name} was replaced or changed after it was "
                                   "checked: refused")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read_file(self, name: str) -> bytes:
        fd = self._open(name)
        with open(fd, "rb") as f:
            return f.read()

    def iter_problems(self, deferred=None) -> Iterator[tuple[str, str]]:
        """Yield (file name, message) for each missing, extra, truncated or altered file; the
        content of those `deferred(name)` selects is not read (see verify())."""
        try:
            present = set(os.listdir(self.dir_fd))
        except OSError as exc:
            raise from_oserror(exc, f"reading {self.path}", ImageCorrupt) from exc
        for name in sorted(present - set(self.files) - {CHECKSUMS}):
            yield name, f"{name}: unexpected file in image (not listed in checksums)"
        for entry in self.files.values():
            if entry.name not in present:
                yield entry.name, f"{entry.name} missing"
                continue
            problem = self._check_file(entry, content=not (deferred and deferred(entry.name)))
            if problem:
                yield entry.name, problem

    def _check_file(self, entry: ImageFile, content: bool = True) -> str | None:
        try:
            fd = self._open(entry.name)
        except ImageCorrupt as exc:
            return str(exc)
        except OSError as exc:
            return f"{entry.name}: {exc.strerror}"
        with open(fd, "rb", buffering=0):  # owns fd
            st = os.fstat(fd)
            size = st.st_size
            if size < entry.size:
                return f"{entry.name}: truncated ({size} of {entry.size} bytes)"
            if size > entry.size:
                return f"{entry.name}: size {size}, expected {entry.size} (image corrupted)"
            if not content:
                self._deferred[entry.name] = _identity(st)
                return None
            hasher = xxhash.xxh3_128()
            if size:  # hashed straight from the page cache, no copy
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
                    # large read-ahead: pages written with direct I/O are read from the disk
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                    with memoryview(mapped) as view:
                        for offset in range(0, size, _VERIFY_CHUNK):
                            hasher.update(view[offset:offset + _VERIFY_CHUNK])
                            # out of this process's resident set (the page cache keeps it)
                            mapped.madvise(mmap.MADV_DONTNEED, offset,
                                           min(_VERIFY_CHUNK, size - offset))
            if _identity(os.fstat(fd)) != _identity(st):
                return f"{entry.name}: changed while it was checked"
        if hasher.hexdigest() != entry.digest:
            return f"{entry.name}: checksum mismatch (image corrupted)"
        self._checked[entry.name] = _identity(st)
        self._deferred.pop(entry.name, None)
        return None

    def deferred(self, name: str) -> bool:
        """Whether the content of `name` is still to be checked (verify(deferred=...))."""
        return name in self._deferred

    def confirm(self, name: str, fd: int, digest: str) -> None:
        """End the deferred check of `name`: read through on `fd`, its bytes hash to `digest`.
        ImageCorrupt if that is not the listed checksum, or the file changed meanwhile."""
        identity = self._deferred.get(name, self._checked.get(name))  # (read through twice)
        if _identity(os.fstat(fd)) != identity:
            raise ImageCorrupt(f"{self.path}: {name} changed while it was read: refused")
        if digest != self.files[name].digest:
            raise ImageCorrupt(f"{name}: checksum mismatch (image corrupted)")
        self._deferred.pop(name, None)
        self._checked[name] = identity

    def verify_deferred(self, but: set[str] = frozenset()) -> None:
        """Check the deferred files that no one read through, but those in `but` (a lazy
        restore's: read through later)."""
        self.verify_files([name for name in self._deferred if name not in but])

    def stat(self) -> os.stat_result:
        """The image directory's own stat (its owner decides what it may restore)."""
        return os.fstat(self.dir_fd)

    def verify(self, deferred=None) -> None:
        """Check every file against ``checksums``; raise ImageCorrupt on the first problem.

        Of the files `deferred(name)` selects (a restore's pages), only the presence, kind,
        owner and size are checked here; their content is checked by whoever reads them through
        (PageReader: hashed as they are read, confirm()) or by verify_deferred(), which the
        caller must call before it trusts what it read."""
        for _, message in self.iter_problems(deferred):
            raise ImageCorrupt(message)

    def verify_files(self, names: list[str]) -> None:
        """verify() for the files of `names` that the image lists."""
        for name in names:
            if name in self.files:
                problem = self._check_file(self.files[name])
                if problem:
                    raise ImageCorrupt(problem)

    def path_of(self, name: str) -> Path:
        if not valid_name(name):
            raise ImageCorrupt(f"invalid image file name {name!r}")
        if name not in self.files:
            raise ImageCorrupt(f"{name}: not listed in checksums (image corrupted)")
        return self.path / name

    def open_file(self, name: str) -> int:
        """A read-only descriptor on a listed image file (regular file, symlinks refused)."""
        self.path_of(name)
        try:
            return self._open(name)
        except FileNotFoundError:
            raise ImageCorrupt(f"{name} missing") from None
        except OSError as exc:
            raise from_oserror(exc, f"reading {self.path / name}", ImageCorrupt) from exc

    def read_bytes(self, name: str) -> bytes:
        with open(self.open_file(name), "rb") as f:
            return f.read()

    def meta(self) -> dict:
        """The parsed and structurally checked ``image.json``."""
        if self._meta is None:
            try:
                meta = json.loads(self.read_bytes(META))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ImageCorrupt(f"{META}: malformed JSON ({exc})") from None
            check_meta(meta, FORMAT_VERSION)
            self._meta = meta
        return self._meta
