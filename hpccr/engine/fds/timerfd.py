"""timerfd: clock, settime flags, remaining time, interval and pending expirations.

Dump: timerfd_gettime on a borrowed copy first, which brings an expired periodic timer up to
date exactly as the process's own read or timerfd_gettime would (the kernel re-arms such a timer
lazily, and until then fdinfo shows no remaining time and too few ticks); then fdinfo gives
everything under one lock.

Restore, and what happens to time while the job is not running:
- a relative timer, and an absolute one on a clock that does not survive a reboot or a move to
  another node (CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_BOOTTIME_ALARM), gets the remaining time it
  had at the dump: for it, time stands still while the job is checkpointed, and expirations that
  would have fallen in that gap never happen;
- an absolute CLOCK_REALTIME (or CLOCK_REALTIME_ALARM) timer keeps its wall-clock expiry: if that
  passed while the job was not running it fires as soon as it is restored, and a periodic one
  then counts every period missed, as if the job had been running all along;
- expirations pending at the dump (counted, not yet read) are kept (TFD_IOC_SET_TICKS, as CRIU
  does), so the first read after the restore returns them.
The timer is armed when the restored task reopens its descriptors, before its memory is rebuilt,
so the restore's own duration (milliseconds to seconds) counts as running time.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import time

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds.common import borrowed, cbuf
from hpccr.errors import DumpFailed, ImageCorrupt
from hpccr.image.schema import U64

NAME = "timerfd"
LINK = "anon_inode:[timerfd]"
FIELDS = {"clockid": int, "settime_flags": int, "ticks": U64, "value_ns": int,
          "interval_ns": int, "clock_ns": int}
ITIMERSPEC = struct.Struct("<qqqq")  # it_interval, it_value: (tv_sec, tv_nsec) each
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, u64)
CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
          8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
WALL_CLOCKS = (0, 8)
NS = 1_000_000_000
_TIMESPEC = re.compile(r"\((-?\d+), (\d+)\)")


def recognise(link: str, st: os.stat_result, state) -> bool:
    return link == LINK


def _ns(text: str) -> int:
    m = _TIMESPEC.fullmatch(text)
    if m is None:
        raise DumpFailed(f"unexpected timerfd time {text!r} in fdinfo")
    return int(m[1]) * NS + int(m[2])


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    with borrowed(pid, fd) as copy:
        _out, addr = cbuf(ITIMERSPEC.size)
        native.syscall("timerfd_gettime", copy, addr)
    info = procfs.fdinfo(pid, fd)
    clockid = int(info["clockid"])
    value, interval = _ns(info["it_value"]), _ns(info["it_interval"])
    if not value and interval:
        value = interval  # expired again since timerfd_gettime, and that expiry is in ticks
    return {"clockid": clockid, "settime_flags": int(info["settime flags"], 8),
            "ticks": int(info["ticks"]), "value_ns": value, "interval_ns": interval,
            "clock_ns": time.clock_gettime_ns(clockid)}


def check(entry: dict, ctx) -> None:
    bad = None
    if entry["clockid"] not in CLOCKS:
        bad = f"unknown clock {entry['clockid']}"
    elif entry["settime_flags"] & ~(TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET):
        bad = f"unknown settime flags {entry['settime_flags']:#o}"
    elif min(entry["value_ns"], entry["interval_ns"], entry["clock_ns"]) < 0:
        bad = "negative time"
    if bad:
        raise ImageCorrupt(f"fd {entry['fd']}: timerfd with {bad} (image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    clockid, flags = entry["clockid"], entry["settime_flags"]
    fd = native.syscall("timerfd_create", clockid, os.O_CLOEXEC | entry["flags"] & os.O_NONBLOCK)
    value = entry["value_ns"]
    if value:
        if flags & TFD_TIMER_ABSTIME:
            value += entry["clock_ns"] if clockid in WALL_CLOCKS else time.clock_gettime_ns(clockid)
        _spec, addr = cbuf(ITIMERSPEC.pack(*divmod(entry["interval_ns"], NS), *divmod(value, NS)))
        native.syscall("timerfd_settime", fd, flags, addr, 0)
    if entry["ticks"]:
        fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", entry["ticks"]))
    return fd
