"""A series of checkpoints of one job in one directory, as `hpccr run --interval` writes it:

    DIR/ckpt-0001/  DIR/ckpt-0002/ ...  one image each
    DIR/latest -> ckpt-0002             moved last, atomically, once an image is committed

Older images beyond the newest `keep` are removed after `latest` has moved, so at every moment
`latest` names a complete image — except those a kept image leaves pages to (an incremental
image's parent, image/chain.py, and its parent in turn): they stay as long as a kept image needs
them, so that `keep` never leaves a broken chain.

A checkpoint of a job on several nodes is a directory of one image per part,
`ckpt-NNNN/part-<slot>` (hpccr/mpi/coordinate.py).  `hpccr restore -D DIR` accepts the series
directory and restores its latest image.

A checkpoint being written into a series holds an exclusive flock on its directory, a restore
reading one of its images a shared one (`in_use`): two checkpoints into one series, or a
checkpoint and a restore of it, never overlap (the rotation of old images would remove the one
being restored); the later one is refused (Busy) and nothing of it is left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from hpccr.errors import Busy, ImageCorrupt, ImageNotFound, ImageWriteError, from_oserror

LATEST = "latest"
PART = "part-"  # the image of each part of a job on several nodes: part-<slot>
_NAME = re.compile(r"^ckpt-(\d+)$")


class Series:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def images(self) -> list[Path]:
        """Committed images, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def next_path(self) -> Path:
        images = self.images()
        number = int(_NAME.match(images[-1].name).group(1)) + 1 if images else 1
        return self.dir / f"ckpt-{number:04d}"

    def latest(self) -> Path | None:
        link = self.dir / LATEST
        if not link.is_symlink():
            return None
        target = self.dir / os.readlink(link)
        return target if target.is_dir() else None

    def publish(self, image: Path, keep: int) -> None:
        """Point `latest` at `image` (atomically), then keep only the newest `keep` images."""
        tmp = self.dir / f".{LATEST}.{os.getpid()}"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(image.name, tmp)
            os.replace(tmp, self.dir / LATEST)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ImageWriteError(f"cannot update {self.dir / LATEST}: {exc.strerror}") from exc
        images = self.images()
        needed = self._with_parents(images[-keep:] if keep > 0 else images)
        for old in images:
            if old != image and old not in needed:
                shutil.rmtree(old, ignore_errors=True)

    def _with_parents(self, kept: list[Path]) -> set[Path]:
        """The `kept` images and every image they leave pages to."""
        needed: set[Path] = set()
        for image in kept:
            while image is not None and image not in needed:
                needed.add(image)
                image = self._parent(image)
        return needed

    def _parent(self, image: Path) -> Path | None:
        """The image of this series that `image` leaves pages to, as its image.json says."""
        try:
            parent = json.loads((image / "image.json").read_bytes()).get("parent")
            name = parent["image"] if parent else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # unreadable: chain.py refuses it at restore
        return self.dir / name if isinstance(name, str) and _NAME.match(name) else None


@contextlib.contextmanager
def in_use(directory: str | os.PathLike, exclusive: bool) -> Iterator[None]:
    """The series `directory` is, or holds the image `directory` names (a checkpoint of it, or
    a part of one), is in use for the block: written into (`exclusive`) or read by a restore.
    Nothing to hold for an image outside a series."""
    path = Path(directory)
    series = next((p for p in (path, path.parent, path.parent.parent)
                   if (p / LATEST).is_symlink() or p == path and exclusive), None)
    fd = None
    if series is not None:
        try:
            if exclusive:
                os.makedirs(series, exist_ok=True)  # the first checkpoint of a series makes it
            fd = os.open(series, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            # A restore by root for a user, on a file system that maps root to nobody, reads
            # the image with the user's rights: the image says itself what it cannot read.
            if exclusive or not isinstance(exc, PermissionError):
                error = ImageWriteError if exclusive else ImageNotFound
                raise from_oserror(exc, f"opening {series}", error) from exc
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            # ENOLCK, EOPNOTSUPP: a file system without locks (NFS without its lock service)
            if exc.errno == errno.EWOULDBLOCK:
                doing = "checkpoint the job into it" if exclusive else "restore from it"
                raise Busy(f"{series} is in use by another hpccr (a checkpoint being written "
                           f"into it, or a restore reading it): cannot {doing} now") from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise from_oserror(exc, f"locking {series}", ImageCorrupt) from exc
        yield
    finally:
        os.close(fd)


def resolve(directory: str | os.PathLike, slot: int | None = None) -> Path:
    """The image to restore for `directory`: itself, or the latest image of a series.  In a
    checkpoint of a job on several nodes (one image per part, part-<slot>), the image of the
    part at `slot` (hpccr/mpi/coordinate.py)."""
    path = Path(directory)
    try:
        if not (path / "checksums").exists() and not (path / "image.json").exists():
            latest = Series(path).latest()
            if latest is None and path.is_dir() and Series(path).images():
                raise ImageNotFound(f"{path} holds checkpoints but no '{LATEST}' link to a "
                                    "complete one")
            path = latest or path
        if (path / f"{PART}0").is_dir():
            if slot is None:
                nodes = len(list(path.glob(f"{PART}*")))
                raise ImageNotFound(f"{path} is a checkpoint of a job on {nodes} nodes, "
                                    "restored here as a job on one node (no HPCCR_NODE_SLOT): "
                                    "a job cannot run on fewer nodes than it was "
                                    "checkpointed on")
            if not (path / f"{PART}{slot}").is_dir():
                raise ImageNotFound(f"{path} has no part at node slot {slot}")
            return path / f"{PART}{slot}"
    except OSError as exc:
        raise from_oserror(exc, f"reading {path}", ImageCorrupt) from exc
    return path  # let the image reader say what is wrong with it
