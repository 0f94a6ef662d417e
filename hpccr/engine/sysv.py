"""SysV IPC: the shared memory segments, semaphore sets and message queues of a job's IPC
namespace, saved once per image and made again, with the same ids, in the restored job's.

Only a job of `hpccr run` has an IPC namespace of its own, whose objects are all the job's.  A
tree dumped by its root pid shares the machine's namespace, where nothing tells which objects
are its own: the dump refuses such a tree if it maps a SysV segment, and does not save the
semaphores and queues it may use (docs/image-format.md).

Dump: a short-lived child of hpccr (single-threaded, so setns() into an IPC namespace is
allowed) enters the job's namespace, lists /proc/sysvipc/{shm,sem,msg} there, copies each
segment's content (attached read-only), each set's values (GETALL) and each queue's messages
(msgrcv with MSG_COPY, which leaves them queued), and hands all of it to hpccr through a pipe.

Restore: in the new job's pid 1, right after it entered its namespaces and before any process
exists to attach anything, each object is created with its key and its id (the wanted id is
written to /proc/sys/kernel/{shm,sem,msg}_next_id just before the get call), given its owner and
mode (IPC_SET) and filled.  The processes attach the segments again themselves (memory.py, kind
"sysvshm"); a segment that was removed while attached (IPC_RMID) is removed again once attached.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct

from hpccr import native
from hpccr.errors import DumpFailed, RestoreFailed, UnsupportedResource

IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
GETALL, SETALL = 13, 17
MSG_COPY = 0o40000
SHM_RDONLY = 0o10000
SHM_DEST = 0o1000  # in a segment's mode: removed, alive while attached
CLONE_NEWIPC = 0x8000000
PERM = struct.Struct("<iIIIII")  # struct ipc64_perm: key, uid, gid, cuid, cgid, mode
QBYTES = struct.Struct("<Q")  # msqid64_ds.msg_qbytes
QBYTES_AT = 88
DS_SIZE = 128  # larger than shmid64_ds, semid64_ds and msqid64_ds
LENGTH = struct.Struct("<Q")
CHUNK = 8 << 20


def _table(name: str) -> list[dict[str, int]]:
    """/proc/sysvipc/NAME of the caller's IPC namespace: one dict per object, by column."""
    with open(f"/proc/sysvipc/{name}") as f:
        header, *rows = f.read().splitlines()
    columns = header.split()
    return [{col: int(v, 8 if col == "perms" else 10) for col, v in zip(columns, row.split(),
                                                                     strict=True)}
            for row in rows]


def _record(row: dict[str, int], id_column: str) -> dict:
    return {"key": row["key"], "id": row[id_column], "mode": row["perms"], "uid": row["uid"],
            "gid": row["gid"]}


def _ptr(buf) -> int:
    return int(native.ffi.cast("long", buf))


# --- dump ----------------------------------------------------------------------------------


def dump_namespace(root: int, pidns: bool, procs: list[dict], writer) -> dict | None:
    """The SysV objects of the job rooted at `root` (as hpccr sees it), its segments' contents
    streamed into `writer`; None for a tree without an IPC namespace of its own."""
    own = pidns and os.stat(f"/proc/{root}/ns/ipc").st_ino != os.stat("/proc/self/ns/ipc").st_ino
    if not own:
        for proc in procs:
            for vma in proc["vmas"]:
                if vma["kind"] == "sysvshm":
                    raise UnsupportedResource(
                        f"process {proc['pid']} maps SysV shared memory segment {vma['shmid']}: "
                        "SysV IPC objects are saved only for jobs of hpccr run (which have an "
                        "IPC namespace of their own)")
        return None
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        _helper(root, wr)
    os.close(wr)
    try:
        with os.fdopen(rd, "rb") as pipe:
            size = LENGTH.unpack(_read_exact(pipe, LENGTH.size))[0]
            state = json.loads(_read_exact(pipe, size))
            if "error" in state:
                raise DumpFailed(f"reading the job's SysV IPC objects: {state['error']}")
            for shm in state["shm"]:
                with writer.open_stream(shm["data"]) as out:
                    left = shm["size"]
                    while left:
                        chunk = _read_exact(pipe, min(left, CHUNK))
                        out.write(chunk)
                        left -= len(chunk)
    finally:
        os.waitpid(pid, 0)
    return state


def _read_exact(pipe, size: int) -> bytes:
    data = pipe.read(size)
    if len(data) != size:
        raise DumpFailed("the SysV IPC reader ended early")
    return data


def _helper(root: int, out: int) -> None:
    """In the forked child: enter the job's IPC namespace, describe it, send it.  Never
    returns."""
    try:
        fd = os.open(f"/proc/{root}/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
        native.syscall("setns", fd, CLONE_NEWIPC)
        segments = [_record(row, "shmid") | {"size": row["size"],
                                             "data": f"sysv-shm-{row['shmid']}.img"}
                    for row in _table("shm")]
        state = {"shm": segments,
                 "sem": [_record(row, "semid") | {"values": _sem_values(row)}
                         for row in _table("sem")],
                 "msg": [_record(row, "msqid") | _messages(row) for row in _table("msg")]}
        _send(out, state)
        for shm in segments:
            _send_content(out, shm)
        code = 0
    except BaseException as exc:  # report, whatever it was, then die
        with contextlib.suppress(OSError):
            _send(out, {"error": str(exc) or repr(exc)})
        code = 1
    os._exit(code)


def _send(out: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    _write_all(out, LENGTH.pack(len(data)) + data)


def _write_all(out: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(out, view):]


def _sem_values(row: dict[str, int]) -> list[int]:
    values = native.ffi.new("unsigned short[]", max(row["nsems"], 1))
    native.syscall("semctl", row["semid"], 0, GETALL, _ptr(values))
    return list(values)[: row["nsems"]]


def _messages(row: dict[str, int]) -> dict:
    """The queue's messages in order, copied (MSG_COPY), and its byte limit."""
    ds = native.ffi.new("char[]", DS_SIZE)
    native.syscall("msgctl", row["msqid"], IPC_STAT, _ptr(ds))
    qbytes = QBYTES.unpack(native.ffi.buffer(ds, DS_SIZE)[QBYTES_AT:QBYTES_AT + 8])[0]
    size = max(row["cbytes"], 1)
    buf = native.ffi.new("char[]", 8 + size)
    messages = []
    for index in range(row["qnum"]):
        n = native.syscall("msgrcv", row["msqid"], _ptr(buf), size, index,
                           MSG_COPY | IPC_NOWAIT)
        raw = native.ffi.buffer(buf, 8 + n)[:]
        messages.append({"type": struct.unpack_from("<Q", raw)[0],
                         "data": base64.b64encode(raw[8:]).decode()})
    return {"qbytes": qbytes, "messages": messages}


def _send_content(out: int, shm: dict) -> None:
    addr = native.syscall("shmat", shm["id"], 0, SHM_RDONLY)
    try:
        for offset in range(0, shm["size"], CHUNK):
            length = min(CHUNK, shm["size"] - offset)
            _write_all(out, native.ffi.buffer(native.ffi.cast("char *", addr + offset), length))
    finally:
        native.syscall("shmdt", addr)


# --- restore -------------------------------------------------------------------------------


def restore_namespace(state: dict, reader) -> None:
    """Make the saved objects again in the caller's (new, empty) IPC namespace."""
    for shm in state["shm"]:
        key = 0 if shm["mode"] & SHM_DEST else shm["key"]
        _create("shm", shm, key, shm["size"])
        _set_owner("shmctl", shm)
        _fill_segment(shm, reader)
    for sem in state["sem"]:
        _create("sem", sem, sem["key"], len(sem["values"]))
        _set_owner("semctl", sem)
        if sem["values"]:
            values = native.ffi.new("unsigned short[]", sem["values"])
            native.syscall("semctl", sem["id"], 0, SETALL, _ptr(values))
    for msg in state["msg"]:
        _create("msg", msg, msg["key"])
        _set_owner("msgctl", msg, qbytes=msg["qbytes"])
        for message in msg["messages"]:
            data = base64.b64decode(message["data"])
            buf = native.ffi.new("char[]", struct.pack("<Q", message["type"]) + data)
            native.syscall("msgsnd", msg["id"], _ptr(buf), len(data), IPC_NOWAIT)


def _create(kind: str, obj: dict, *args: int) -> None:
    """{kind}get(*args, flags) creating `obj` with its saved id."""
    with open(f"/proc/sys/kernel/{kind}_next_id", "w") as f:
        f.write(str(obj["id"]))
    try:
        got = native.syscall(f"{kind}get", *args, IPC_CREAT | IPC_EXCL | (obj["mode"] & 0o777))
    except OSError as exc:
        raise RestoreFailed(f"cannot create SysV {kind} {obj['id']} (key {obj['key']}): "
                            f"{exc.strerror}") from None
    if got != obj["id"]:
        raise RestoreFailed(f"SysV {kind} {obj['id']} was created as {got}")


def _set_owner(ctl: str, obj: dict, qbytes: int | None = None) -> None:
    ds = native.ffi.new("char[]", DS_SIZE)
    native.syscall(ctl, obj["id"], *([0] if ctl == "semctl" else []), IPC_STAT, _ptr(ds))
    raw = bytearray(native.ffi.buffer(ds, DS_SIZE))
    key, _, _, cuid, cgid, _ = PERM.unpack_from(raw)
    PERM.pack_into(raw, 0, key, obj["uid"], obj["gid"], cuid, cgid, obj["mode"] & 0o777)
    if qbytes is not None:
        QBYTES.pack_into(raw, QBYTES_AT, qbytes)
    native.ffi.memmove(ds, bytes(raw), DS_SIZE)
    native.syscall(ctl, obj["id"], *([0] if ctl == "semctl" else []), IPC_SET, _ptr(ds))


def _fill_segment(shm: dict, reader) -> None:
    addr = native.syscall("shmat", shm["id"], 0, 0)
    try:
        with open(reader.open_file(shm["data"]), "rb") as src:
            offset = 0
            while chunk := src.read(CHUNK):
                if offset + len(chunk) > shm["size"]:
                    raise RestoreFailed(f"{shm['data']} is larger than its segment")
                native.ffi.memmove(native.ffi.cast("char *", addr + offset), chunk, len(chunk))
                offset += len(chunk)
    finally:
        native.syscall("shmdt", addr)


def remove_attached(inj, vmas: list[dict], state: dict | None) -> None:
    """In a restored process that attached its segments again: remove (IPC_RMID) those that
    were removed while attached.  The kernel lets later processes attach them still."""
    removed = {shm["id"] for shm in (state or {"shm": []})["shm"] if shm["mode"] & SHM_DEST}
    for shmid in {v["shmid"] for v in vmas if v["kind"] == "sysvshm"} & removed:
        inj.call("shmctl", shmid, IPC_RMID, 0)
