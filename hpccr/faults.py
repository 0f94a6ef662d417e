"""Fault injection for the tests: HPCCR_FAULT=<point>[:N][@R] makes hpccr SIGKILL itself the
N-th time (default: the first) it reaches the named point, so that a test can check what a dump
or restore interrupted exactly there leaves behind; with @R, only in run R of a Slurm job
(SLURM_RESTART_COUNT, 0 for the first run: a requeued job keeps its environment).  Unset,
every point costs one dict lookup.  HPCCR_PAUSE=<point>:<file> makes the thread that reaches
the named pause wait there until the file exists: a test holds one side of a race back."""

from __future__ import annotations

import os
import signal
import time

_wanted, _, _run = os.environ.get("HPCCR_FAULT", "").partition("@")
if _run and _run != (os.environ.get("SLURM_RESTART_COUNT") or "0"):
    _wanted = ""
_name, _, _count = _wanted.partition(":")
_remaining = {_name: int(_count or 1)} if _name else {}
_pause, _, _pause_until = os.environ.get("HPCCR_PAUSE", "").partition(":")
PAUSE_POLL_S = 0.01


def point(name: str) -> None:
    """A place where hpccr may die; dies there if HPCCR_FAULT names it and its turn has come."""
    if name in _remaining:
        _remaining[name] -= 1
        if _remaining[name] == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def pause(name: str) -> None:
    """A place where hpccr may wait; waits there if HPCCR_PAUSE names it, until its file exists."""
    if name == _pause:
        while not os.path.exists(_pause_until):
            time.sleep(PAUSE_POLL_S)
