"""Terminals: a descriptor on a terminal is reconnected, at restore, to the terminal that
`hpccr restore` runs on (like cr_restart), since the original one may be gone."""

from __future__ import annotations

import os
import stat

from hpccr.errors import UnsupportedResource

NAME = "tty"
FIELDS: dict = {}
TTY_MAJORS = (4,)  # /dev/ttyN; /dev/pts/N are pty.py's (as terminals, when outside the dump)
TTY_DEVICES = ("/dev/tty", "/dev/console")


def recognise(link: str, st: os.stat_result, state) -> bool:
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev) in TTY_MAJORS
                                         or link in TTY_DEVICES)


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    return {}


def restorer_terminal() -> int | None:
    return next((fd for fd in (0, 1, 2) if os.isatty(fd)), None)


def check(entry: dict, ctx) -> None:
    if restorer_terminal() is None:
        raise UnsupportedResource(f"fd {entry['fd']} was a terminal ({entry['path']}); "
                                  "run hpccr restore from a terminal")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    return os.dup(restorer_terminal())
