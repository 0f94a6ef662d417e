"""Credentials and resource limits: uids/gids/groups, capabilities, no_new_privs, dumpable,
umask, rlimits.  Restored last, per thread, after everything that needs privilege is done."""

from __future__ import annotations

import resource
import struct
import sys

from hpccr.engine import procfs
from hpccr.errors import UnsupportedResource

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
CAPABILITY_V3 = 0x20080522
CAP_LAST = 63
RLIM64_INFINITY = (1 << 64) - 1
RLIMITS = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}


def ids(pid: int) -> dict:
    """The ids, groups and capabilities of process `pid`, as an image records them."""
    return _ids(procfs.status(pid))


def _ids(st: dict) -> dict:
    return {
        "uid": [int(x) for x in st["Uid"].split()],
        "gid": [int(x) for x in st["Gid"].split()],
        "groups": [int(x) for x in st.get("Groups", "").split()],
        "cap_inh": st["CapInh"], "cap_prm": st["CapPrm"], "cap_eff": st["CapEff"],
        "cap_bnd": st["CapBnd"], "cap_amb": st["CapAmb"],
    }


def dump_creds(pid: int, inj) -> dict:
    st = procfs.status(pid)
    if st.get("Seccomp", "0") != "0":
        raise UnsupportedResource(f"process {pid} runs under a seccomp filter (not supported)")
    return _ids(st) | {
        "no_new_privs": int(st.get("NoNewPrivs", "0")),
        "dumpable": inj.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0),
    }


def umask(pid: int) -> int:
    return int(procfs.status(pid).get("Umask", "0022"), 8)


def restore_creds(inj, thread, creds: dict) -> None:
    """Drop to the saved credentials inside one thread (injected calls run with its creds)."""
    bounding = int(creds["cap_bnd"], 16)
    for cap in range(CAP_LAST + 1):
        if not bounding & (1 << cap):
            try:
                inj.call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0, thread=thread)
            except OSError:
                break  # past the last capability this kernel knows
    groups = creds["groups"]
    ptr = inj.put(struct.pack(f"<{len(groups)}I", *groups)) if groups else 0
    inj.call("setgroups", len(groups), ptr, thread=thread)
    permitted = int(creds["cap_prm"], 16)
    uid, gid = creds["uid"], creds["gid"]
    if permitted and any(uid[:3]):
        inj.call("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0, thread=thread)
    inj.call("setresgid", gid[0], gid[1], gid[2], thread=thread)
    inj.call("setresuid", uid[0], uid[1], uid[2], thread=thread)
    inj.call("setfsgid", gid[3], thread=thread)
    inj.call("setfsuid", uid[3], thread=thread)
    effective, inheritable = int(creds["cap_eff"], 16), int(creds["cap_inh"], 16)
    header = inj.put(struct.pack("<Ii", CAPABILITY_V3, 0))
    data = inj.put(struct.pack("<6I", effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF,
                               inheritable & 0xFFFFFFFF, effective >> 32, permitted >> 32,
                               inheritable >> 32))
    inj.call("capset", header, data, thread=thread)
    ambient = int(creds["cap_amb"], 16)
    for cap in range(CAP_LAST + 1):
        if ambient & (1 << cap):
            inj.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0, thread=thread)
    if permitted and any(uid[:3]):
        inj.call("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0, thread=thread)
    inj.call("prctl", PR_SET_DUMPABLE, creds["dumpable"], 0, 0, 0, thread=thread)
    if creds["no_new_privs"]:
        inj.call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, thread=thread)
    inj.reset()


def _limit(value: int) -> int:
    return -1 if value in (resource.RLIM_INFINITY, RLIM64_INFINITY) else value


def dump_rlimits(inj) -> dict[str, list[int]]:
    """Read by the process itself: prlimit() on another user's process needs CAP_SYS_RESOURCE,
    which hpccr must not depend on."""
    area = inj.alloc(16)
    limits = {}
    for name, res in sorted(RLIMITS.items()):
        inj.call("prlimit64", 0, res, 0, area)
        limits[name] = [_limit(v) for v in struct.unpack("<QQ", inj.get(area, 16))]
    inj.reset()
    return limits


def restore_rlimits(pid: int, limits: dict[str, list[int]], raise_hard: bool) -> None:
    """prlimit from outside.  A hard limit above the new task's (the restorer's, what a job
    started here gets) is raised only with `raise_hard` (an image only root could have
    written: a user's image never gets more than that) and where CAP_SYS_RESOURCE is granted;
    otherwise it is kept at the current hard value and a warning says so."""
    for name, (soft, hard) in limits.items():
        res = RLIMITS.get(name)
        if res is None:
            continue
        want = tuple(resource.RLIM_INFINITY if v == -1 else v for v in (soft, hard))
        cur_hard = resource.prlimit(pid, res)[1]
        if raise_hard or not _above(want[1], cur_hard):
            try:
                resource.prlimit(pid, res, want)
                continue
            except (PermissionError, ValueError):
                pass
        resource.prlimit(pid, res, (cur_hard if _above(want[0], cur_hard) else want[0], cur_hard))
        print(f"hpccr: warning: {name} hard limit {hard} cannot be raised here; "
              f"kept at {_limit(cur_hard)}", file=sys.stderr)


def _above(limit: int, other: int) -> bool:
    """Is resource limit `limit` above `other` (RLIM_INFINITY above all)?"""
    if limit == resource.RLIM_INFINITY:
        return other != resource.RLIM_INFINITY
    return other != resource.RLIM_INFINITY and limit > other
