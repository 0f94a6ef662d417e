"""The user whose processes and images hpccr handles, and what that user may have.

Root may act for one user (`hpccr run/restore --user`, used by the privileged side of a Slurm
job): the job then runs with that user's credentials, hpccr reads and writes images with that
user's file-system rights only — so the images are the user's, and no path the user controls
can make root read or write anywhere else — and a restore accepts only processes with that
user's ids and no capabilities.  The same limits hold for any image not owned by root: a
restored process never gets more than the owner of its image had.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from hpccr import native
from hpccr.errors import AccessDenied, FileMismatch, HpccrError

NO_CAPS = 0
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, as initgroups() would set them

    @classmethod
    def lookup(cls, spec: str) -> User:
        """By name or uid."""
        try:
            pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
        except KeyError:
            raise HpccrError(f"no such user: {spec}") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid,
                   tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    @classmethod
    def owner_of(cls, st: os.stat_result) -> User:
        """The owner of a file; one without a passwd entry has the file's group and no other."""
        try:
            return cls.lookup(str(st.st_uid))
        except HpccrError:
            return cls(str(st.st_uid), st.st_uid, st.st_gid, (st.st_gid,))

    def take_fs_rights(self) -> None:
        """From now on this (root) process writes and creates files as the user: call it
        before any thread exists, threads inherit it.

        The kernel drops the file-system capabilities with the fsuid; the right to read any
        file (CAP_DAC_READ_SEARCH) is taken back, since hpccr must read the /proc files of
        the tasks it restores (root's until their credentials come back, last).  The image
        itself is opened without it (`reading_as_user`), its files are opened relative to that
        directory and must be regular files, and what it restores gets the user's credentials,
        whatever the image says."""
        if os.geteuid() != 0:
            raise AccessDenied("--user needs root")
        os.setgroups(list(self.groups))
        native.syscall("setfsgid", self.gid)
        native.syscall("setfsuid", self.uid)
        _set_read_override(True)

    @contextlib.contextmanager
    def reading_as_user(self):
        """Without the right to read any file, for a while: what is opened meanwhile (an
        image, which the user names) must be readable by the user."""
        _set_read_override(False)
        try:
            yield
        finally:
            _set_read_override(True)

    @contextlib.contextmanager
    def file_rights(self):
        """This user's file-system rights and no more, for a while, in a root process (one
        whose rights take_fs_rights() set, or root's own, which come back after)."""
        with fs_rights(self.uid, self.gid, self.groups):
            _set_read_override(False)
            try:
                yield
            finally:
                _set_read_override(True)

    def check_executable(self, pid: int, exe: str) -> tuple[int, int]:
        """The file (st_dev, st_ino) that process `pid` of an image of this user runs, if this
        user may run it: a file they may execute, through directories they may search, and no
        set-user-ID, set-group-ID or file-capability program that would give another's rights
        (a process restored with it would carry that program's name, which other programs
        trust, around memory the user wrote)."""
        try:
            with self.file_rights():
                fd = os.open(exe, os.O_PATH | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    link = f"/proc/self/fd/{fd}"
                    executable = os.access(link, os.X_OK, effective_ids=True)
                    privileged = _file_capabilities(link)
                finally:
                    os.close(fd)
        except PermissionError:
            executable = False
        except OSError as exc:
            raise FileMismatch(f"the executable {exe} of process {pid}: "
                               f"{os.strerror(exc.errno)}") from None
        what = f"process {pid} runs {exe}"
        if not executable or not stat.S_ISREG(st.st_mode):
            raise AccessDenied(f"{what}, which user {self.name} may not execute: refused")
        if st.st_mode & stat.S_ISUID and st.st_uid != self.uid:
            raise AccessDenied(f"{what}, a set-user-ID program of uid {st.st_uid}: refused "
                               f"for user {self.name}")
        if (st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP
                and st.st_gid not in {self.gid, *self.groups}):
            raise AccessDenied(f"{what}, a set-group-ID program of {_group_name(st.st_gid)}: "
                               f"refused for user {self.name}")
        if privileged:
            raise AccessDenied(f"{what}, a program with file capabilities: refused for user "
                               f"{self.name}")
        return st.st_dev, st.st_ino

    def become(self) -> None:
        """Drop every privilege for good and become the user (in a child about to exec)."""
        os.setgroups(list(self.groups))
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)

    def excess(self, creds: dict) -> str | None:
        """What in `creds` (as an image records them) this user could not have, or None."""
        if any(u != self.uid for u in creds["uid"]):
            return f"uids {creds['uid']}"
        allowed = {self.gid, *self.groups}
        extra = (set(creds["gid"]) | set(creds["groups"])) - allowed
        if extra:
            names = sorted(extra)
            return f"groups {', '.join(_group_name(g) for g in names)}"
        for field in ("cap_prm", "cap_eff", "cap_inh", "cap_amb"):
            if int(creds[field], 16) != NO_CAPS:
                return f"capabilities ({field} {creds[field]})"
        return None


@contextlib.contextmanager
def fs_rights(uid: int, gid: int, groups) -> Iterator[None]:
    """The file-system rights of `uid`, `gid` and `groups` in this (root) process, for a while
    (what it had comes back after)."""
    saved_groups = os.getgroups()
    os.setgroups(list(groups))
    saved_fsgid = native.syscall("setfsgid", gid)
    saved_fsuid = native.syscall("setfsuid", uid)
    try:
        yield
    finally:
        native.syscall("setfsuid", saved_fsuid)
        native.syscall("setfsgid", saved_fsgid)
        os.setgroups(saved_groups)


def _file_capabilities(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:  # ENODATA: none (and a file system without xattrs has none either)
        return False


def _set_read_override(on: bool) -> None:
    """CAP_DAC_READ_SEARCH in or out of this thread's effective set (it stays permitted)."""
    header = native.ffi.new("uint32_t[2]", [LINUX_CAPABILITY_VERSION_3, 0])
    data = native.ffi.new("uint32_t[6]")  # effective, permitted, inheritable; two words each
    args = (int(native.ffi.cast("long", header)), int(native.ffi.cast("long", data)))
    native.syscall("capget", *args)
    if on:
        data[0] |= 1 << CAP_DAC_READ_SEARCH
    else:
        data[0] &= ~(1 << CAP_DAC_READ_SEARCH)
    native.syscall("capset", *args)


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
