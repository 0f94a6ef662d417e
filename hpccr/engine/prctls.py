"""Process attributes set with prctl() that are neither credentials nor memory: whether the
process is a child subreaper (orphans below it are re-parented to it) and its parent-death
signal.  Read from inside the target.  The first is set again by the new task before it becomes
the stub, so that it already holds while the tree is being rebuilt; the second at the end of its
rebuild (until then the new task dies with its parent: restore._die_with_parent)."""

from __future__ import annotations

import struct

from hpccr import native

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


def dump(inj) -> dict[str, int]:
    area = inj.alloc(4)
    values = {}
    for key, request in (("child_subreaper", PR_GET_CHILD_SUBREAPER),
                         ("pdeathsig", PR_GET_PDEATHSIG)):
        inj.call("prctl", request, area, 0, 0, 0)
        values[key] = struct.unpack("<i", inj.get(area, 4))[0]
    inj.reset()
    return values


def restore(proc: dict) -> None:
    """In the new task itself (its own prctl)."""
    native.syscall("prctl", PR_SET_CHILD_SUBREAPER, proc["child_subreaper"])
