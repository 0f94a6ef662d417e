"""The per-job checkpoint directory, as the prolog makes it and the epilog leaves it.

    <checkpoint_base>/                 root, 0755 (or 1777 on a root-squashed NFS share)
    <checkpoint_base>/<user>/          the user, 0700
    <checkpoint_base>/<user>/<jobid>/  the user, 0700: the job's checkpoint series
        ckpt-0001/ ckpt-0002/ latest   (hpccr/image/series.py)
        RECORD                         one line per run start and end, human-readable

Everything inside <user>/ is done with the user's identity (see `as_user`), so a root prolog
or epilog can never be tricked into touching a file the user could not touch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from hpccr.image.series import Series

RECORD = "RECORD"
_STARTED = re.compile(r" run (\d+) started")
PARTIAL = re.compile(r"^\.(ckpt-\d+\.partial-.*|latest\..*)$")  # left by a cut-off checkpoint


@contextlib.contextmanager
def as_user(uid: int, gid: int):
    """Run the body with the user's effective uid, gid and groups (no-op unless we are root)."""
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([gid])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def ensure_user_dir(base: Path, uid: int, gid: int) -> Path:
    """<base>/<user> for a uid, created if missing; refuses one that is not the user's own."""
    user_dir = base / pwd.getpwuid(uid).pw_name
    if not base.is_dir():
        os.makedirs(base, 0o755, exist_ok=True)
    try:
        with as_user(uid, gid):  # works on a sticky, world-writable base (root-squashed NFS)
            os.mkdir(user_dir, 0o700)
    except FileExistsError:
        pass
    except PermissionError:
        try:
            os.mkdir(user_dir, 0o700)
        except FileExistsError:
            pass
        else:
            fd = os.open(user_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
    st = os.lstat(user_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise PermissionError(errno.EPERM, f"not a directory owned by uid {uid}", str(user_dir))
    return user_dir


@dataclass
class Checkpoint:
    path: Path
    size: int  # bytes
    mtime: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.mtime))
        return f"{self.path.name} ({human_size(self.size)}, {when})"


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    exponent = min(3, (size.bit_length() - 1) // 10)
    return f"{size / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def checkpoints(job_dir: Path) -> list[Checkpoint]:
    """The job's committed checkpoints, oldest first (call as the user)."""
    return [Checkpoint(p, _tree_size(p), p.stat().st_mtime) for p in Series(job_dir).images()]


def latest(job_dir: Path) -> Path | None:
    return Series(job_dir).latest()


def remove_partials(job_dir: Path) -> list[str]:
    """Remove what a checkpoint cut off by the end of the job left behind; returns the names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(job_dir):
            if PARTIAL.match(entry.name):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                removed.append(entry.name)
    return removed


class Record:
    """RECORD in a job directory: one line per run start (prolog) and end (epilog)."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / RECORD

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def append(self, node: str, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {node} {text}\n".encode())
        finally:
            os.close(fd)

    def started_run(self) -> int | None:
        """The restart count the newest run started with, per its prolog's line."""
        runs = [int(m.group(1)) for line in self.lines() if (m := _STARTED.search(line))]
        return runs[-1] if runs else None
