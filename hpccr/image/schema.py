"""Structural check of ``image.json`` (docs/image-format.md), so no KeyError/TypeError escapes.

A spec is a type (``int`` excludes bool, ``float`` accepts ints), ``None``, ``U64`` (an int in
[0, 2**64)), a dict of required keys (extra keys are allowed), a one-element list (every item
matches it), ``MapOf(spec)`` (a dict with str keys and values matching spec), or a tuple of
alternatives.  ``check_meta`` checks a whole image.json; ``check_part`` checks one part against
a spec kept elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpccr.errors import ImageCorrupt


@dataclass(frozen=True)
class MapOf:
    value: object


U64 = "u64"

_REGS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()

THREAD = {
    "tid": int,
    "comm": str,
    "regs": dict.fromkeys(_REGS, U64),
    "xstate": str,
    "xcomp_perm": int,
    "sigmask": int,
    "pending": [str],
    "sigaltstack": {"sp": int, "flags": int, "size": int},
    "clear_child_tid": int,
    "robust_list": [int],
    "rseq": ({"ptr": int, "len": int, "sig": int}, None),
    "sched": {"affinity": [int], "nice": int, "policy": int, "priority": int},
}

VMA = {
    "start": int,
    "end": int,
    "prot": str,
    "shared": bool,
    "kind": str,
    "path": (str, None),
    "offset": int,
    "file": ({"size": int, "mtime_ns": int, "ghost": (str, None)}, None),
    "saved_pages": int,
    "advice": [str],
    "may_write": bool,
    "policy": (str, None),
}

FD = {
    "fd": int,
    "kind": str,
    "path": (str, None),
    "flags": int,
    "pos": int,
    "cloexec": bool,
    "desc": int,
    "ghost": (str, None),
    "mode": int,
    "locks": [{"kind": str, "type": str, "start": int, "end": (int, None)}],
    "sigio": ({"owner_type": int, "owner": int, "signal": int}, None),
}

POSIX_TIMER = dict.fromkeys(
    "id clockid notify signo tid interval_ns value_ns overrun".split(), int
) | {"value": U64}

_MM_FIELDS = (
    "start_code end_code start_data end_data start_brk brk start_stack arg_start arg_end "
    "env_start env_end"
).split()

PROCESS = {
    "pid": int,
    "ppid": int,
    "pgid": int,
    "sid": int,
    "comm": str,
    "exe": str,
    "cmdline": [str],
    "creds": {
        "uid": [int],
        "gid": [int],
        "groups": [int],
        "cap_inh": str,
        "cap_prm": str,
        "cap_eff": str,
        "cap_bnd": str,
        "cap_amb": str,
        "no_new_privs": int,
        "dumpable": int,
    },
    "cwd": str,
    "umask": int,
    "personality": int,
    "rlimits": MapOf([int]),
    "mm": {**dict.fromkeys(_MM_FIELDS, int), "auxv": str},
    "vmas": [VMA],
    "pages": str,
    "pagemap": str,
    "nr_pages": int,
    "sigactions": [{"signo": int, "handler": int, "flags": int, "restorer": int, "mask": int}],
    "itimers": {"real": [int], "virtual": [int], "prof": [int]},
    "posix_timers": [POSIX_TIMER],
    "shared_pending": [str],
    "fds": [FD],
    "threads": [THREAD],
    "child_subreaper": int,
    "pdeathsig": int,
    "exit_status": (int, None),
    "stopped": bool,
    "main_thread_exited": bool,
    "shares_with_parent": [str],
}

_SYSV_OBJECT = {"key": int, "id": int, "mode": int, "uid": int, "gid": int}

SYSV = {
    "shm": [_SYSV_OBJECT | {"size": int, "data": str}],
    "sem": [_SYSV_OBJECT | {"values": [int]}],
    "msg": [_SYSV_OBJECT | {"qbytes": int, "messages": [{"type": U64, "data": str}]}],
}

GPU = {  # "gpu": only in an image of GPU processes (hpccr/engine/gpu.py)
    "cuda_version": int,
    "driver": (str, None),
    "checkpoint_s": float,  # the driver's lock and checkpoint of them all
    "processes": [{"pid": int, "devices": [{"uuid": str, "model": str}]}],
}

PARENT = {"image": str, "checksums": str}  # "parent": only in an incremental image (chain.py)

IMAGE = {
    "format": str,
    "format_version": int,
    "hpccr_version": str,
    "created": str,
    "hostname": str,
    "kernel": str,
    "cpu": {"xfeatures": int, "xstate_size": int},
    "root_pid": int,
    "pidns": bool,
    "sysv": (SYSV, None),
    "network": ({"address": str, "hostname": str}, None),
    "timing": {"frozen_s": float, "dump_s": float},
    "processes": [PROCESS],
}


def _fail(where: str, what: str) -> ImageCorrupt:
    return ImageCorrupt(f"image.json: {where}: {what} (image corrupted)")


def _check(value, spec, where: str) -> None:
    if isinstance(spec, tuple):
        for alternative in spec:
            try:
                _check(value, alternative, where)
                return
            except ImageCorrupt:
                continue
        raise _fail(where, "unexpected value")
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _fail(where, "expected an object")
        for key, sub in spec.items():
            if key not in value:
                raise _fail(where, f"missing {key!r}")
            _check(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise _fail(where, "expected a list")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise _fail(where, "expected an object")
        for key, item in value.items():
            _check(item, spec.value, f"{where}.{key}")
    elif spec is None:
        if value is not None:
            raise _fail(where, "expected null")
    elif spec is U64:
        if type(value) is not int or not 0 <= value < 1 << 64:
            raise _fail(where, "expected an unsigned 64-bit integer")
    elif spec is float:
        if type(value) not in (int, float):
            raise _fail(where, "expected a number")
    elif spec is int:
        if type(value) is not int:
            raise _fail(where, "expected an integer")
        if not -(1 << 63) <= value < 1 << 64:
            raise _fail(where, "integer out of range (64 bits)")
    elif not isinstance(value, spec):
        raise _fail(where, f"expected {spec.__name__}")


def check_part(value, spec, where: str) -> None:
    """Raise ImageCorrupt unless ``value`` matches ``spec``: for the parts of image.json whose
    spec lives with the code that writes them (the fields of each descriptor kind)."""
    _check(value, spec, where)


def check_meta(meta, version: int) -> None:
    """Raise ImageCorrupt unless ``meta`` is a well-formed image.json of ``version``."""
    if not isinstance(meta, dict) or meta.get("format") != "hpccr-image":
        raise ImageCorrupt("image.json: not an hpccr image description (image corrupted)")
    if meta.get("format_version") != version or type(meta["format_version"]) is not int:
        raise ImageCorrupt(f"unsupported image format version {meta.get('format_version')!r}")
    _check(meta, IMAGE, "image")
    if "gpu" in meta:
        _check(meta["gpu"], GPU, "image.gpu")
    if "parent" in meta:
        _check(meta["parent"], PARENT, "image.parent")
    pids = [proc["pid"] for proc in meta["processes"]]
    if len(set(pids)) != len(pids):
        raise _fail("processes", "duplicate pid")
    if meta["root_pid"] not in pids:
        raise _fail("root_pid", f"process {meta['root_pid']} not in the image")
    tids = [thread["tid"] for proc in meta["processes"] for thread in proc["threads"]]
    if len(set(tids)) != len(tids):
        raise _fail("processes", "duplicate thread id")
    for proc in meta["processes"]:
        leader = [t["tid"] for t in proc["threads"][:1]] == [proc["pid"]]
        if proc["exit_status"] is None and not proc["threads"]:
            raise _fail(f"process {proc['pid']}", "no threads")
        if proc["exit_status"] is None and leader == proc["main_thread_exited"]:
            raise _fail(f"process {proc['pid']}", "the thread group leader must come first, "
                        "unless it has exited (and is not listed)")
        if proc["main_thread_exited"] and any(t["tid"] == proc["pid"] for t in proc["threads"]):
            raise _fail(f"process {proc['pid']}", "its exited main thread is listed")
