"""Unix domain sockets whose every peer is inside the dumped processes: socketpairs, bound and
listening sockets and the connections made through them, sockets neither connected nor
listening (never bound, or only bound) — stream, datagram, seqpacket — with the data queued in
each direction, the shutdown state and the options that matter.

The kernel tells what each socket is through netlink sock_diag (pyroute2): its type and state,
bound name, peer, queue lengths, the clients waiting in a listener's accept queue and the inode
of its socket file.  The queued data is read without consuming it, since the job may run on
after the dump: a copy of the receiving socket (pidfd_getfd) is peeked with MSG_PEEK, stepping
through the queue with SO_PEEK_OFF (put back as it was afterwards), message by message for
datagram and seqpacket sockets so that their boundaries are kept.

At restore the first socket opened creates every socket of the image at once (in the restorer, or in
the first process of a job restored into its own pid namespace, see below): bound sockets bind their
name again (a stale socket file left at that path is removed; a path some running socket answers on
is refused; a name whose file had been removed, or whose directory, is bound as _bind says, and its
file and directories are gone again), listeners listen; the connections made through a listener of
the image are made again through it (connect, then accept), so that names and the accept queue come
back; other connected pairs are socketpairs, or are connected through a temporary listener (see
below), with the name of the listener they were accepted from if that listener is not in the image
(closed since, or outside the dump).  The saved data is written into each receiving socket's peer,
so that it lands in the right queue, then shutdowns are applied and the ends whose peers had been
closed lose them again.

Datagrams sent to a bound socket's name by other sockets (sendto, as MPICH's ranks do) are
sent again at restore, each from the restored socket that had sent it (by its name), or from a
new socket without a name where the sender had none.

Refused: a socket connected to, or listened on by, a process outside the dump; a connection
waiting in an accept queue that already carries data (it can only be read by accepting it);
queued ancillary data (SCM_RIGHTS descriptors, SCM_CREDENTIALS); queued datagrams on a socket
without a name and no one connected sender in the dump, or from a socket outside the dump;
sockets bound to a relative path.

Peer credentials (SO_PEERCRED) are recorded by the kernel from the task that makes a socketpair,
listens or connects.  The dump records the pid each socket reports (as the job sees pids); the
restorer does each of these calls in a short-lived child with the credentials of the process
that holds the socket (for a connection: of the process holding the other end) and, where that
pid is free, with the recorded pid: the kernel keeps reporting a pid number after its process
has exited, so the restored processes then get that pid.  A job restored into its own pid
namespace makes its sockets in its first process, inside that namespace, so that the pids are
the job's.  A connected pair whose ends report different pids (made by connect and accept
through a listener not in the image) is made through a temporary listener.  Not kept: the pid of a
process of a pid-namespaced job that had exited, or one taken by another process at restore
(then it is the helper's).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import socket
import stat
import struct

from hpccr import native
from hpccr.engine import netlink, procfs
from hpccr.engine.fds.common import borrowed, held_files, saved_data
from hpccr.errors import FileMismatch, ImageCorrupt, RestoreFailed, UnsupportedResource

NAME = "unix"
INSIDE_JOB = True  # peer credentials hold pids: the job's own
FIELDS = {
    "socket": int,
    "type": str,
    "state": str,
    "name": (str, None),
    "file_mode": (int, None),
    "peer": (int, None),
    "listener": (int, None),
    "backlog": (int, None),
    "pending": [int],
    "shutdown": int,
    "data": (str, None),
    "sender": (int, None),
    "sources": ([int], None),
    "options": {"passcred": bool, "rcvbuf": int, "sndbuf": int, "peek_off": int},
    "peer_pid": (int, None),
}
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
         socket.SOCK_SEQPACKET: "seqpacket"}
SOCK_TYPES = {name: number for number, name in TYPES.items()}
STATES = {1: "connected", 7: "unconnected", 10: "listening"}
SHOW = (netlink.UDIAG_SHOW_NAME | netlink.UDIAG_SHOW_PEER | netlink.UDIAG_SHOW_RQLEN
        | netlink.UDIAG_SHOW_ICONS | netlink.UDIAG_SHOW_VFS)
SO_PEEK_OFF = 42
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
SHUT = {RCV_SHUTDOWN: socket.SHUT_RD, SEND_SHUTDOWN: socket.SHUT_WR,
        RCV_SHUTDOWN | SEND_SHUTDOWN: socket.SHUT_RDWR}
MESSAGE = struct.Struct("<I")  # length of each message in a datagram/seqpacket data file
ANCILLARY = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12)
SO_PEERPIDFD = 77
UCRED = struct.Struct("3i")
FILL_SNDBUF = 64 << 20  # the writer's send buffer while it puts the saved data back
PEEK_SIZE = 1 << 20  # at least, the buffer a message is peeked into
BY_SOURCE = -1  # `sender` of datagrams sent to a name by others: `sources` names each one's
ANONYMOUS = -1  # in `sources`: a sender without a name


def _diag() -> dict[int, dict]:
    """Every unix socket of this network namespace, by inode."""
    with netlink.DiagSocket() as ds:
        ds.bind()
        msgs = ds.get_sock_stats(family=socket.AF_UNIX, states=netlink.SS_ALL, show=SHOW)
    table = {}
    for m in msgs:
        icons = m.get_attr("UNIX_DIAG_ICONS")
        raw = bytes.fromhex(icons.replace(":", "")) if icons else b""
        vfs = m.get_attr("UNIX_DIAG_VFS")
        rqlen = m.get_attr("UNIX_DIAG_RQLEN") or {}
        table[m["udiag_ino"]] = {
            "type": m["udiag_type"], "state": m["udiag_state"],
            "name": m.get_attr("UNIX_DIAG_NAME") or None, "peer": m.get_attr("UNIX_DIAG_PEER"),
            "rqueue": rqlen.get("udiag_rqueue", 0), "wqueue": rqlen.get("udiag_wqueue", 0),
            "icons": [i for (i,) in struct.iter_unpack("<I", raw)],
            "vfs": vfs["udiag_vfs_ino"] if vfs else None,
            "shutdown": m.get_attr("UNIX_DIAG_SHUTDOWN") or 0}
    return table


def recognise(link: str, st: os.stat_result, state) -> bool:
    return stat.S_ISSOCK(st.st_mode) and st.st_ino in _view(state).table


def _view(state) -> View:
    """The dump's View, made on first use."""
    if state.unix is None:
        state.unix = View(state.pids)
    return state.unix


class View:
    """The dump's view of unix sockets: the kernel's table and which dumped descriptors hold
    each socket, made once per dump."""

    def __init__(self, pids):
        self.table = _diag()
        self.held: dict[int, tuple[int, int]] = {}
        for pid, fd, st in held_files(pids):
            if stat.S_ISSOCK(st.st_mode):
                self.held.setdefault(st.st_ino, (pid, fd))
        self.saved: set[int] = set()  # sockets whose data file is written

    def listener_of(self, s: dict) -> int | None:
        """The listening socket a connected socket was accepted from (it has the listener's
        name and socket file); 0: accepted from a listener not in the dump, outside it or closed
        since (its peer, the client, has no name of its own, or other sockets have the same
        name); None: not accepted, or not known to be (a name it bound itself)."""
        if s["state"] != 1 or not s["name"] or s["type"] == socket.SOCK_DGRAM:
            return None
        key = (s["name"], s["vfs"])
        found = [i for i, o in self.table.items() if o["state"] == 10
                 and (o["name"], o["vfs"]) == key]
        if found:
            return next((i for i in found if i in self.held), 0)
        peer = self.table.get(s["peer"])
        if peer is not None and not peer["name"] or sum(
                (o["name"], o["vfs"]) == key for o in self.table.values()) > 1:
            return 0
        return None

    def queued_on(self, ino: int) -> int | None:
        """The listener whose accept queue holds this client's connection."""
        return next((i for i, o in self.table.items() if o["state"] == 10
                     and ino in o["icons"]), None)


def _holder(ino: int, pids) -> str:
    """Who outside the dump holds socket `ino`, for a message."""
    link = f"socket:[{ino}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in pids:
            continue
        try:
            fds = os.listdir(os.path.join(entry.path, "fd"))
            for fd in fds:
                if os.readlink(os.path.join(entry.path, "fd", fd)) == link:
                    return f"process {entry.name} ({procfs.comm(int(entry.name))}) fd {fd}"
        except OSError:
            continue
    return "no process visible here"


def _refuse(pid: int, fd: int, what: str) -> None:
    raise UnsupportedResource(f"process {pid} fd {fd} is a unix socket {what}: not supported yet")


def _peek(copy: int, pid: int, fd: int, limit: int | None,
          sources: list | None = None) -> list[bytes]:
    """The queued messages (stream: chunks) of the socket behind `copy`, left in place; a
    stream or seqpacket socket holds `limit` bytes.  The address each came from (None: a
    socket without a name) goes to `sources`, in order."""
    sock = socket.socket(fileno=os.dup(copy))
    saved_off = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    size = max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), PEEK_SIZE)
    out = []
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        while True:
            try:
                data, anc, flags, source = sock.recvmsg(size, ANCILLARY,
                                                        socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    for (n,) in struct.iter_unpack("i", payload[:len(payload) // 4 * 4]):
                        os.close(n)
            if anc or flags & socket.MSG_CTRUNC:
                _refuse(pid, fd, "with ancillary data queued (SCM_RIGHTS descriptors or "
                        "SCM_CREDENTIALS)")
            if flags & socket.MSG_TRUNC:
                _refuse(pid, fd, f"with a queued message of more than {size} bytes")
            if not data:
                break  # end of file (after a shutdown); empty messages are not kept
            out.append(data)
            if sources is not None:
                sources.append(source or None)
            if limit is not None and sum(map(len, out)) >= limit:
                break
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, saved_off)
        sock.close()
    return out


def _file_mode(pid: int, name: str, vfs: int | None) -> int | None:
    """The mode of the socket file at `name` if it is still this socket's, else None."""
    try:
        st = os.stat(procfs.path(pid, "root") + name)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if st.st_ino == vfs and stat.S_ISSOCK(st.st_mode) else None


def _peer_pid(sock: socket.socket, pidns: bool) -> int | None:
    """The pid SO_PEERCRED reports on `sock`, as the image records pids, or None: no peer
    credentials, or, for a job with a pid namespace of its own, not a live process of it."""
    pid, _, _ = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             UCRED.size))
    if not pid or not pidns:
        return pid or None
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return None
    try:
        with builtins.open(f"/proc/self/fdinfo/{pidfd}") as f:
            nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
    finally:
        os.close(pidfd)
    return int(nspid[-1]) if len(nspid) > 1 else None  # -1: exited; 1 level: outside the job


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    view = _view(state)
    ino = st.st_ino
    s = view.table[ino]
    kind, where = TYPES.get(s["type"]), STATES.get(s["state"])
    if kind is None or where is None:
        _refuse(pid, fd, f"of type {s['type']} in state {s['state']}")
    name = s["name"]
    if s["vfs"] is not None and not name.startswith("/"):
        _refuse(pid, fd, f"bound to the relative path {name}")
    listener = view.listener_of(s)
    entry = {"socket": ino, "type": kind, "state": where, "name": None, "file_mode": None,
             "peer": s["peer"], "listener": listener, "backlog": None, "pending": [],
             "shutdown": s["shutdown"], "data": None, "sender": None}
    if s["vfs"] is not None and not listener:
        entry["name"] = name
        entry["file_mode"] = _file_mode(pid, name, s["vfs"])
    elif name and not listener:
        entry["name"] = "\0" + name  # abstract (sock_diag gives it without its leading NUL)
    if s["peer"] and s["peer"] not in view.held:
        _refuse(pid, fd, f"connected to a socket held by {_holder(s['peer'], state.pids)}, "
                "outside what is dumped: dump the whole job (hpccr run)")
    if where == "listening":
        entry["backlog"] = s["wqueue"]
        for client in s["icons"]:
            if client not in view.held:
                _refuse(pid, fd, f"listening, with a connection from {_holder(client, state.pids)}"
                        " waiting to be accepted, outside what is dumped")
        entry["pending"] = s["icons"]
    if s["peer"] == 0 and where == "connected":
        queued = view.queued_on(ino)
        if queued is not None:
            entry["listener"], entry["peer"] = queued, None
            if s["wqueue"]:
                _refuse(pid, fd, "whose connection waits in an accept queue with data sent on "
                        "it (it can only be read by accepting it)")
    for other, o in view.table.items():
        if o["peer"] == ino and other and other not in view.held:
            _refuse(pid, fd, f"that a socket held by {_holder(other, state.pids)} is connected "
                    "to, outside what is dumped")
    with borrowed(pid, fd) as copy:
        sock = socket.socket(fileno=os.dup(copy))
        try:
            entry["options"] = {
                "passcred": bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)),
                "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                "peek_off": sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)}
            entry["peer_pid"] = _peer_pid(sock, state.pidns)
        finally:
            sock.close()
        limit = s["rqueue"] if kind != "dgram" else None  # sock_diag: all bytes queued
        sources: list = []
        # A listener has no data queue, nor has a stream or seqpacket socket that is not
        # connected (recv refuses it: EINVAL, ENOTCONN); an unconnected datagram socket may
        # hold datagrams sent to its name.
        queues = where == "connected" or where == "unconnected" and kind == "dgram"
        messages = _peek(copy, pid, fd, limit, sources) if queues else []
    entry["sources"] = None
    if messages:
        entry["sender"] = _sender(view, ino, s, kind, pid, fd)
        if entry["sender"] == BY_SOURCE:
            entry["sources"] = [_source(view, name, pid, fd) for name in sources]
        entry["data"] = f"unix-{ino}.img"
        if ino not in view.saved:
            view.saved.add(ino)
            if kind == "stream":
                state.writer.write_bytes(entry["data"], b"".join(messages))
            else:
                state.writer.write_bytes(entry["data"], b"".join(
                    MESSAGE.pack(len(m)) + m for m in messages))
    return entry


def _sender(view: View, ino: int, s: dict, kind: str, pid: int, fd: int) -> int:
    """The socket whose writes land in this one's queue: its peer (0: closed), or for a datagram
    socket the one socket of the dump connected to it; BY_SOURCE for datagrams sent to a bound
    socket's name by others (sendto): `sources` then names each one's sender."""
    if kind != "dgram":
        return s["peer"] or 0
    senders = [o for o, other in view.table.items() if other["peer"] == ino and o in view.held]
    if len(senders) == 1:
        return senders[0]
    if not s["name"]:
        _refuse(pid, fd, "without a name, with queued datagrams from no one socket of the dump")
    return BY_SOURCE


def _source(view: View, address, pid: int, fd: int) -> int:
    """The socket of the dump that sent a datagram from `address` (recvmsg's), ANONYMOUS for a
    sender without a name."""
    if address is None:
        return ANONYMOUS
    name = address[1:].decode(errors="surrogateescape") if isinstance(address, bytes) \
        else address
    found = [i for i, o in view.table.items() if o["name"] == name and i in view.held]
    if len(found) != 1:
        _refuse(pid, fd, f"with a queued datagram from {name!r}, a socket not in the dump")
    return found[0]


def check(entry: dict, ctx) -> None:
    fd = entry["fd"]
    if entry["type"] not in SOCK_TYPES or entry["state"] not in STATES.values():
        raise ImageCorrupt(f"fd {fd}: unknown unix socket type or state (image corrupted)")
    if (entry["data"] is None) != (entry["sender"] is None):
        raise ImageCorrupt(f"fd {fd}: inconsistent unix socket entry (image corrupted)")


def _address(name: str) -> str | bytes:
    return os.fsencode(name) if name.startswith("\0") else name


def _bind(sock: socket.socket, e: dict, ctx, remove_later: list[tuple[object, str]]
          ) -> str | bytes:
    """Bind `sock` to the entry's name; returns the address that reaches it from now on.

    A stale socket file at that path is removed first.  A name whose file had been removed
    (the socket file unlinked, its directory too, and maybe a newer socket bound to the same
    name since) is bound again with its missing directories made for the while, and its file is
    moved aside at once, to a temporary name in the same directory: the name is the socket's
    again (getsockname), the path is free for a newer socket, and the temporary name reaches it
    until the restore removes that name and the directories it made (`remove_later`)."""
    name = e["name"]
    gone = e["file_mode"] is None and not name.startswith("\0")
    if gone:
        remove_later += [(ctx, d) for d in _make_dirs(os.path.dirname(name), ctx)]
    with ctx.owner_rights():  # or root's for a trusted image: bound before a setuid, say
        if not name.startswith("\0"):
            ctx.as_owner(_clear, name, sock.type)
        ctx.as_owner(sock.bind, _address(name))
        if not gone:
            if e["file_mode"] is not None:
                ctx.as_owner(os.chmod, name, e["file_mode"])
            return _address(name)
        aside = os.path.join(os.path.dirname(name), f".hpccr-{secrets.token_hex(8)}")
        ctx.as_owner(os.rename, name, aside)
    remove_later.append((ctx, aside))
    return aside


def _clear(name: str, kind: int) -> None:
    """Remove the socket file at `name` if nobody answers on it (left by the checkpointed
    socket); refuse a path that is not a socket or that a running socket answers on."""
    try:
        mode = os.lstat(name).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileMismatch(f"{name}, where a unix socket was bound, is not a socket now")
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(name)
        except ConnectionRefusedError:
            os.unlink(name)
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:
                raise
    if os.path.lexists(name):
        raise FileMismatch(f"{name}, where a unix socket was bound, is in use by another "
                           "running socket")


def _make_dirs(directory: str, ctx) -> list[str]:
    """The missing directories of `directory` made (mode 0700, as the owner, or root for a
    trusted image), top first."""
    missing = []
    with ctx.owner_rights():
        while not ctx.as_owner(_exists, directory):
            missing.insert(0, directory)
            directory = os.path.dirname(directory)
        for path in missing:
            ctx.as_owner(os.mkdir, path, 0o700)
    return missing


def _exists(path: str) -> bool:
    """Like os.path.lexists, but PermissionError where the path cannot be looked at."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _remove(remove_later: list[tuple[object, str]]) -> None:
    """What _bind made for the while, the last made first, with the rights that made it."""
    while remove_later:
        ctx, path = remove_later[-1]
        with ctx.owner_rights():
            ctx.as_owner(os.rmdir if stat.S_ISDIR(os.lstat(path).st_mode) else os.unlink, path)
        remove_later.pop()


def _fill_from(writers: list[socket.socket], e: dict, data: bytes,
               address: str | bytes) -> None:
    """Send the saved datagrams of entry `e` (a bound socket, reached at `address`), each from
    the socket that had sent it."""
    messages = list(_messages(e, data))
    if len(messages) != len(writers):
        raise ImageCorrupt(f"{e['data']}: not one sender per datagram (image corrupted)")
    try:
        for writer, message in zip(writers, messages, strict=True):
            writer.setblocking(False)
            writer.sendto(message, address)
    except BlockingIOError:
        raise RestoreFailed(f"unix socket {e['socket']}: its saved queue does not fit "
                            "back") from None


def _messages(e: dict, data: bytes):
    """The messages of a datagram or seqpacket data file."""
    offset = 0
    while offset < len(data):
        (size,) = MESSAGE.unpack_from(data, offset)
        offset += MESSAGE.size
        if offset + size > len(data):
            raise ImageCorrupt(f"{e['data']}: truncated message (image corrupted)")
        yield data[offset:offset + size]
        offset += size


def _fill(sock: socket.socket, e: dict, data: bytes) -> None:
    """Write the saved queue of entry `e` from `sock`, its sender."""
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, FILL_SNDBUF)
    sock.setblocking(False)
    try:
        if e["type"] == "stream":
            view = memoryview(data)
            while view:
                view = view[sock.send(view):]
            return
        for message in _messages(e, data):
            sock.send(message)
    except BlockingIOError:
        raise RestoreFailed(f"unix socket {e['socket']}: its saved queue does not fit "
                            "back") from None


def _as_task(ctx, pid: int | None, call, *args) -> None:
    """call(*args) as a process with the credentials of the process `ctx` restores and, where
    it is free, the pid `pid`: the kernel records both as the peer credentials (SO_PEERCRED)
    of what it creates, connects or listens on.  The descriptors are the caller's, inherited."""
    creds = ctx.proc["creds"]
    if pid is not None and pid == os.getpid():  # the job's first process: itself, for a while
        with _effective_creds(creds):
            call(*args)
        return
    child = _fork_with(pid)
    if child == 0:
        status = 1
        try:
            os.setgroups(creds["groups"])
            os.setresgid(*creds["gid"][:3])
            os.setresuid(*creds["uid"][:3])
            call(*args)
            status = 0
        except BaseException as exc:  # reported by the exit status, then by the message below
            os.write(2, f"hpccr: {call.__name__}: {exc}\n".encode())
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    if status:
        raise RestoreFailed(f"unix socket: {call.__name__} as uid {creds['uid'][1]} failed")


def _fork_with(pid: int | None) -> int:
    """fork(), the child with pid `pid` if that is free."""
    if pid is not None:
        try:
            return native.fork_with_pid(pid)
        except OSError:
            pass  # taken (or out of range): the peer credentials get another pid
    return os.fork()


@contextlib.contextmanager
def _effective_creds(creds: dict):
    """This (root) process with the effective uid, gid and groups of `creds` for a while; its
    real and saved uid stay 0, so it can take root's back."""
    groups = os.getgroups()
    os.setgroups(creds["groups"])
    os.setegid(creds["gid"][1])
    os.seteuid(creds["uid"][1])
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _pair(e: dict, ctx, peer: tuple[dict, object] | None,
          remove_later: list[tuple[object, str]]) -> tuple[socket.socket, socket.socket]:
    """The two connected ends of entry `e` and its `peer` (entry, context; None for a peer
    closed since, whose stand-in the restore closes again), with the peer credentials and
    names they report.

    A socketpair gives both ends the credentials of its maker.  A pair whose ends report
    different pids, or whose accepted end had the name of a listener not in the image (closed
    since, or outside the dump), was made by connect and accept: it is made so again, through a
    temporary listener with that name where it is free, so that each end reports the process
    holding the other."""
    kind = SOCK_TYPES[e["type"]]
    other, other_ctx = peer if peer is not None else (None, ctx)
    named = [x for x in (e, other) if x is not None and x["listener"] == 0 and x["name"]]
    if not named and (other is None or other["peer_pid"] == e["peer_pid"]
                      or kind == socket.SOCK_DGRAM):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            def make() -> None:
                a, b = socket.socketpair(socket.AF_UNIX, kind)
                socket.send_fds(theirs, [b"p"], [a.fileno(), b.fileno()])

            make.__name__ = "socketpair"
            _as_task(ctx, e["peer_pid"], make)
            _, fds, _, _ = socket.recv_fds(ours, 1, 2)
        return socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
    if named and named[0] is e:  # e is the accepted end
        server, server_ctx, client, client_ctx = e, ctx, other, other_ctx
    else:
        server, server_ctx, client, client_ctx = other, other_ctx, e, ctx
    with socket.socket(socket.AF_UNIX, kind) as listener:
        address = None
        if named:
            try:
                address = _bind(listener, server, server_ctx, remove_later)
            except (FileMismatch, OSError):
                pass  # in use, or not ours to make: the accepted end goes without its name
        if address is None:
            listener.bind("")  # an abstract name the kernel picks
            address = listener.getsockname()
        connecting = socket.socket(socket.AF_UNIX, kind)
        try:
            _as_task(server_ctx, client["peer_pid"] if client else None, listener.listen, 1)
            _as_task(client_ctx, server["peer_pid"], connecting.connect, address)
            accepted, _ = listener.accept()
        except BaseException:
            connecting.close()
            raise
    return (accepted, connecting) if server is e else (connecting, accepted)


def _create_all(pool) -> dict[int, int]:
    """Every unix socket of the image, connected, filled and shut down as saved."""
    entries: dict[int, tuple[dict, object]] = {}
    for ctx, table in pool.tables:
        for e in table:
            if e["kind"] == NAME:
                entries.setdefault(e["socket"], (e, ctx))
    socks: dict[int, socket.socket] = {}
    temporary: dict[int, socket.socket] = {}  # ino -> the other end of a closed peer
    remove_later: list[tuple[object, str]] = []  # see _bind
    reach: dict[int, str | bytes] = {}  # a named socket's ino -> the address it is reached at

    def new(ino: int) -> socket.socket:
        if ino not in socks:
            socks[ino] = socket.socket(socket.AF_UNIX, SOCK_TYPES[entries[ino][0]["type"]])
        return socks[ino]

    try:
        for ino, (e, ctx) in entries.items():
            peer = e["peer"]
            if peer and peer in entries and entries[peer][0]["peer"] == ino and ino not in socks \
                    and not e["listener"] and not entries[peer][0]["listener"]:
                socks[ino], socks[peer] = _pair(e, ctx, entries[peer], remove_later)
            elif peer == 0 and not e["listener"]:
                socks[ino], temporary[ino] = _pair(e, ctx, None, remove_later)
        # Names whose file had been removed first: a newer socket may have the path now.
        for ino, (e, ctx) in sorted(entries.items(), key=lambda item: item[1][0]["file_mode"]
                                    is not None):
            if e["name"] is not None and e["listener"] != 0:
                reach[ino] = _bind(new(ino), e, ctx, remove_later)
        for ino, (e, ctx) in entries.items():
            if e["state"] == "listening":
                _as_task(ctx, e["peer_pid"], socks[ino].listen, e["backlog"])
        for ino, (e, _) in entries.items():
            if e["state"] != "listening":
                continue
            address = reach[ino]
            for accepted, (a, _) in entries.items():
                if a["listener"] == ino and a["peer"]:
                    _as_task(entries[a["peer"]][1], a["peer_pid"], new(a["peer"]).connect,
                             address)
                    socks[accepted], _ = socks[ino].accept()
            for client in e["pending"]:
                new(client).setblocking(False)
                holder = entries[client][1]  # most likely the process that connected
                _as_task(holder, holder.proc["pid"], socks[client].connect, address)
        for ino, (e, ctx) in entries.items():
            peer = e["peer"]
            if peer and peer in entries and entries[peer][0]["peer"] != ino:
                if entries[peer][0]["name"] is None:
                    raise RestoreFailed(f"unix socket {ino}: connected to an unnamed socket")
                _as_task(ctx, e["peer_pid"], new(ino).connect,
                         reach.get(peer, _address(entries[peer][0]["name"])))
            new(ino)
        for ino, (e, ctx) in entries.items():
            if e["data"]:
                with ctx.owner_rights():
                    data = saved_data(ctx, e["data"])
                if e["sender"] == BY_SOURCE:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anonymous:
                        if any(i != ANONYMOUS and i not in entries for i in e["sources"] or []):
                            raise ImageCorrupt(f"unix socket {ino}: a datagram from a socket "
                                               "not in the image (image corrupted)")
                        writers = [anonymous if i == ANONYMOUS else new(i)
                                   for i in e["sources"] or []]
                        _fill_from(writers, e, data, reach[ino])
                    continue
                writer = temporary[ino] if e["sender"] == 0 else socks[e["sender"]]
                _fill(writer, e, data)
        for ino, (e, _) in entries.items():
            if e["shutdown"] and e["state"] == "connected" and ino not in temporary:
                socks[ino].shutdown(SHUT[e["shutdown"]])
        _remove(remove_later)
        return {ino: sock.detach() for ino, sock in socks.items()}
    except BaseException:
        with contextlib.suppress(OSError):  # what is left of it: the first error is the one
            _remove(remove_later)
        raise
    finally:
        for sock in [*socks.values(), *temporary.values()]:
            sock.close()


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    """Runs in the restorer: the first socket creates them all; each takes its options."""
    if pool.sockets is None:
        pool.sockets = _create_all(pool)
    try:
        fd = pool.sockets.pop(entry["socket"])
    except KeyError:
        raise ImageCorrupt(f"fd {entry['fd']}: unix socket {entry['socket']} opened twice "
                           "(image corrupted)") from None
    sock = socket.socket(fileno=fd)
    options = entry["options"]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, options["passcred"])
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, options["rcvbuf"] // 2)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, options["sndbuf"] // 2)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, options["peek_off"])
    sock.setblocking(not entry["flags"] & os.O_NONBLOCK)
    return sock.detach()
