"""Ghost files: regular files that were deleted while a process still had them open or mapped.
Their content goes into the image; at restore they are recreated in a private directory, opened
by the restored process, and unlinked again once every opener has them."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

COPY_CHUNK = 8 << 20


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
                while chunk := src.read(COPY_CHUNK):
                    out.write(chunk)
            self.saved[key] = name
        return self.saved[key]


class GhostFiles:
    """Restore side: materialise ghost files for the restored process, owned by its user.

    A ghost is readable and writable by its owner until every opener has it: the process held
    it open with its own mode (O_RDWR, say) whatever mode the file had by the dump (fchmod'ed
    to 0 after it was opened, say).  Its saved mode comes back just before it is unlinked."""

    def __init__(self, reader, uid: int, gid: int):
        self.reader = reader
        self.uid, self.gid = uid, gid
        self.dir: str | None = None
        self.paths: dict[str, str] = {}
        self.modes: dict[str, int] = {}  # name -> the permission bits it had at the dump

    def path(self, name: str, mode: int | None) -> str:
        """Where ghost `name` is, made on first use; `mode`: its st_mode at the dump, None if
        not known (a mapping's)."""
        if name not in self.paths:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="hpccr-ghosts-")
                os.chmod(self.dir, 0o711)
            dest = os.path.join(self.dir, name)
            with open(self.reader.open_file(name), "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, COPY_CHUNK)
            os.chown(dest, self.uid, self.gid)
            os.chmod(dest, stat.S_IRUSR | stat.S_IWUSR)
            self.paths[name] = dest
        if mode is not None:
            self.modes[name] = stat.S_IMODE(mode)
        return self.paths[name]

    def unlink_all(self) -> None:
        if self.dir:
            for name, mode in self.modes.items():
                os.chmod(self.paths[name], mode)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


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
        with open(self.reader.open_file(name), "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, COPY_CHUNK)

    def unlink_all(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
