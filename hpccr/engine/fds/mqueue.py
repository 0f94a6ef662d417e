"""POSIX message queues (mq_open): the queue's name, attributes and messages.

Dump: the messages are taken out of the queue through a descriptor of hpccr's own (a new open
file description: the process's flags are not touched) and put back at once in the order they
came out (highest priority first, in order within one), which is the queue's order again; the
queue then holds what it held.  They are saved once per queue, in ``mqueue-<inode>.img``: for
each message its priority and length (two little-endian u32) and its bytes.  A queue with a
notification registered (mq_notify) is refused.

Restore: the first descriptor of a queue makes it (inside the job's IPC namespace for a job
restored into its own) with its name, mode, attributes and messages; an unlinked queue is made
under a name of its own and unlinked at once.  A queue of that name that exists already (a
process restored by pid on the node it ran on: queues outlive their processes) is the queue
itself, used as it is.  Every descriptor then reopens the queue with its own flags.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct

from hpccr import native
from hpccr.engine import procfs
from hpccr.engine.fds.common import NOT_REOPENED, cbuf, saved_data
from hpccr.errors import ImageCorrupt, UnsupportedResource

NAME = "mqueue"
INSIDE_JOB = True  # a job's queues live in its own IPC namespace
FIELDS = {"queue": int, "name": str, "deleted": bool, "maxmsg": int, "msgsize": int,
          "messages": (str, None)}
MQUEUE_MAGIC = 0x19800202
ATTR = struct.Struct("8q")  # struct mq_attr: flags, maxmsg, msgsize, curmsgs, 4 reserved
HEADER = struct.Struct("<II")  # a saved message: priority, length
PAST = struct.Struct("qq").pack(0, 0)  # an absolute timeout long gone: never block
MAX_MSGSIZE = 16 << 20  # the kernel's HARD_MSGSIZEMAX
MAX_MSG = 65536  # HARD_MSGMAX


def recognise(link: str, st: os.stat_result, state) -> bool:
    return state.fs_type(st.st_dev) == MQUEUE_MAGIC


def _attr(fd: int) -> tuple[int, ...]:
    buf, addr = cbuf(ATTR.size)
    native.syscall("mq_getsetattr", fd, 0, addr)
    return ATTR.unpack(bytes(native.ffi.buffer(buf)))


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    deleted = link.endswith(procfs.DELETED)
    name = link[: -len(procfs.DELETED)] if deleted else link
    entry = {"queue": st.st_ino, "name": name, "deleted": deleted, "maxmsg": 0, "msgsize": 0,
             "messages": None}
    own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        _, entry["maxmsg"], entry["msgsize"], count = _attr(own)[:4]
        if _notify_pid(own):
            raise UnsupportedResource(f"process {pid} fd {fd} is message queue {name} with a "
                                      "notification registered (mq_notify): not supported yet")
        if st.st_ino in state.mqueues or not count:
            return entry
        state.mqueues.add(st.st_ino)
        messages = _take_all(own, entry["msgsize"])
        _put_back(own, messages)
    finally:
        os.close(own)
    entry["messages"] = f"mqueue-{st.st_ino}.img"
    state.writer.write_bytes(entry["messages"], b"".join(
        HEADER.pack(prio, len(data)) + data for prio, data in messages))
    return entry


def _notify_pid(fd: int) -> int:
    """The pid registered for notification (0: none), from the queue's file text."""
    text = os.pread(fd, 256, 0).decode(errors="replace")
    field = text.split("NOTIFY_PID:")[-1].split()
    return int(field[0]) if field and field[0].isdigit() else 0


def _take_all(fd: int, msgsize: int) -> list[tuple[int, bytes]]:
    buf, addr = cbuf(msgsize)
    prio_buf, prio_addr = cbuf(4)
    _, past = cbuf(PAST)
    messages = []
    while True:
        try:
            size = native.syscall("mq_timedreceive", fd, addr, msgsize, prio_addr, past)
        except OSError as exc:
            if exc.errno == errno.ETIMEDOUT:
                return messages
            raise
        prio = int.from_bytes(bytes(native.ffi.buffer(prio_buf)), "little")
        messages.append((prio, bytes(native.ffi.buffer(buf, size))))


def _put_back(fd: int, messages: list[tuple[int, bytes]]) -> None:
    _, past = cbuf(PAST)
    for prio, data in messages:
        keep, addr = cbuf(data or b"\0")
        native.syscall("mq_timedsend", fd, addr, len(data), prio, past)
        del keep


def _saved(ctx, entry: dict) -> list[tuple[int, bytes]]:
    data = saved_data(ctx, entry["messages"]) if entry["messages"] else b""
    messages, at = [], 0
    while at < len(data):
        if at + HEADER.size > len(data):
            raise ImageCorrupt(f"{entry['messages']}: truncated (image corrupted)")
        prio, size = HEADER.unpack_from(data, at)
        at += HEADER.size
        if size > entry["msgsize"] or at + size > len(data):
            raise ImageCorrupt(f"{entry['messages']}: a message larger than the queue's or "
                               "than the file (image corrupted)")
        messages.append((prio, data[at:at + size]))
        at += size
    if len(messages) > entry["maxmsg"]:
        raise ImageCorrupt(f"{entry['messages']}: more messages than the queue holds "
                           "(image corrupted)")
    return messages


def check(entry: dict, ctx) -> None:
    name = entry["name"]
    if not name.startswith("/") or "/" in name[1:] or len(name) < 2 or len(name) > 255:
        raise ImageCorrupt(f"fd {entry['fd']}: {name!r} is not a message queue name "
                           "(image corrupted)")
    if not (0 < entry["maxmsg"] <= MAX_MSG and 0 < entry["msgsize"] <= MAX_MSGSIZE):
        raise ImageCorrupt(f"fd {entry['fd']}: message queue attributes out of range "
                           "(image corrupted)")


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    queue = pool.mqueues.get(entry["queue"])
    if queue is None:
        saved = pool.entry_with(lambda e: e["kind"] == NAME and e["queue"] == entry["queue"]
                                and e["messages"] is not None) or entry
        queue = pool.mqueues[entry["queue"]] = _make(saved, ctx)
    flags = entry["flags"] & ~NOT_REOPENED | os.O_CLOEXEC
    return os.open(f"/proc/self/fd/{queue}", flags)


def _make(entry: dict, ctx) -> int:
    """The queue: made with its attributes and messages, or the existing one of its name."""
    name = entry["name"][1:]
    if entry["deleted"]:
        name = f"hpccr-{secrets.token_hex(8)}"
    attr_buf, attr = cbuf(ATTR.pack(0, entry["maxmsg"], entry["msgsize"], 0, 0, 0, 0, 0))
    name_buf, name_addr = cbuf(name.encode())
    create = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = native.syscall("mq_open", name_addr, create, entry["mode"] & 0o777, attr)
    except OSError as exc:
        if exc.errno != errno.EEXIST or entry["deleted"]:
            raise
        return native.syscall("mq_open", name_addr, os.O_RDWR | os.O_CLOEXEC, 0, 0)
    try:
        if entry["deleted"]:
            native.syscall("mq_unlink", name_addr)
        _put_back(fd, _saved(ctx, entry))
    except BaseException:
        os.close(fd)
        raise
    del attr_buf, name_buf
    return fd
