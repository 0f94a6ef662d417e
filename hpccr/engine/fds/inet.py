"""TCP and UDP sockets, IPv4 and IPv6 (v4-mapped addresses on a v6 socket included).

The kernel tells what each socket is through netlink sock_diag (pyroute2): family, protocol,
state, addresses and queue lengths.  The rest is read on a copy of the descriptor
(pidfd_getfd), which is the same socket: its options with getsockopt and, for a TCP
connection, its sequence numbers, negotiated options, window and both queues in the kernel's
repair mode (TCP_REPAIR), which reads them without consuming or sending anything.  Repair mode
is left again (without the window probe it would send) as soon as a socket is read, so that a
dump that fails half-way, or hpccr killed in the middle, leaves every connection as it was.

While the job is frozen the network must not move: every connection of the dump is locked
first (netlock.py: its packets are dropped both ways), so nothing arrives in a queue after it
was read, and no peer is told anything.  A dump that kills the job puts the connections back
in repair mode just before the kill, through copies hpccr holds, so that their close sends
neither FIN nor RST; the lock then stays with the image until a restore lifts it.

A connection is restored in repair mode (CRIU's way): bound and connected without a packet,
its sequence numbers set, the saved receive queue written into its receive queue and the send
queue into its send queue (the kernel counts that data as sent and not yet acknowledged, so it
retransmits it once repair mode ends: the peer drops what it had already received).  A side
that had sent its FIN is shut down for writing in repair mode (its FIN is queued the same
way); a side that had received the peer's FIN is shut down for reading: the program reads the
rest of the data, then end of file (the kernel keeps it as established rather than
CLOSE_WAIT: its own FIN, when it closes, is answered as usual).  Repair mode ends only when
the whole tree is restored (Pool.end_repair), so a restore that fails closes them silently.

A connection whose local address does not exist where it is restored (another node) cannot
come back: the restore fails naming it, or, with --tcp-close, it comes back reset, as after a
network failure (the next read or write gets ECONNRESET).

UDP: bound and connected sockets come back with their addresses and options; datagrams queued
at the moment of the dump are not kept (a network may drop datagrams too).  Refused: a TCP
connect still in progress (SYN sent), a listener with connections waiting in its accept
queue, urgent data, raw and other protocols.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import termios

from hpccr.engine import netlink, netlock, procfs
from hpccr.engine.fds.common import borrowed, saved_data
from hpccr.errors import ImageCorrupt, RestoreFailed, UnsupportedResource

NAME = "inet"
FIELDS = {
    "socket": int,
    "family": str,
    "proto": str,
    "state": str,
    "local": ({"addr": str, "port": int}, None),
    "remote": ({"addr": str, "port": int}, None),
    "backlog": (int, None),
    "options": {"socket": {"reuseaddr": int, "reuseport": int, "keepalive": int,
                           "broadcast": int, "oobinline": int, "priority": int,
                           "rcvbuf": int, "sndbuf": int, "rcvlowat": int,
                           "linger": [int], "rcvtimeo": [int], "sndtimeo": [int]},
                "ip": {"tos": int, "v6only": (int, None), "tclass": (int, None)},
                "tcp": ({"nodelay": int, "cork": int, "keepidle": int, "keepintvl": int,
                         "keepcnt": int, "user_timeout": int, "notsent_lowat": int}, None)},
    "tcp": ({"snd_seq": int, "rcv_seq": int, "mss": int, "snd_wscale": int,
             "rcv_wscale": int, "timestamps": bool, "sack": bool, "timestamp": int,
             "window": [int], "fin_sent": bool, "fin_received": bool,
             "send": (str, None), "recv": (str, None)}, None),
    "lock": (str, None),
}

FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
FAMILY_NUMBERS = {name: number for number, name in FAMILIES.items()}
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
SOCK_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
TCP_STATES = {1: "established", 2: "syn_sent", 4: "fin_wait1", 5: "fin_wait2", 7: "closed",
              8: "close_wait", 9: "last_ack", 10: "listening", 11: "closing"}
FIN_SENT = {"fin_wait1", "fin_wait2", "closing", "last_ack"}
FIN_RECEIVED = {"close_wait", "closing", "last_ack"}
CONNECTED = {"established"} | FIN_SENT | FIN_RECEIVED
# Sockets with a descriptor: not TIME_WAIT or SYN_RECV (kernel-only mini sockets).
DIAG_STATES = netlink.SS_ALL & ~((1 << netlink.SS_TIME_WAIT) | (1 << netlink.SS_SYN_RECV)
                                 | (1 << 12))

# linux/tcp.h
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW, TCP_NOTSENT_LOWAT = 24, 29, 25
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_USER_TIMEOUT = 18
REPAIR_OPT = struct.Struct("II")
REPAIR_WINDOW = struct.Struct("5I")
LINGER = struct.Struct("ii")
TIMEVAL = struct.Struct("ll")
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SIOCOUTQ = termios.TIOCOUTQ
FILL_BUF = 64 << 20  # the buffers while the saved queues are put back
SEQ = 1 << 32


def _diag() -> dict[int, dict]:
    """Every TCP and UDP socket of this network namespace that a descriptor can hold, by
    inode."""
    table = {}
    with netlink.DiagSocket() as ds:
        ds.bind()
        for family in FAMILIES:
            for proto in PROTOCOLS:
                for m in ds.get_sock_stats(family=family, protocol=proto, states=DIAG_STATES):
                    if m["idiag_inode"]:
                        table[m["idiag_inode"]] = {
                            "family": family, "proto": proto, "state": m["idiag_state"],
                            "src": m["idiag_src"], "sport": m["idiag_sport"],
                            "dst": m["idiag_dst"], "dport": m["idiag_dport"],
                            "rqueue": m["idiag_rqueue"], "wqueue": m["idiag_wqueue"]}
    return table


def recognise(link: str, st: os.stat_result, state) -> bool:
    return stat.S_ISSOCK(st.st_mode) and st.st_ino in _view(state).table


def _view(state) -> View:
    """The dump's View (its lock taken), made on first use."""
    if state.inet is None:
        state.inet = View(state.pids, state.own_network)
    return state.inet


class View:
    """The dump's view of network sockets: the kernel's table, a copy of every TCP connection
    of the dump (held until the dump ends), and the lock on them, taken before any is read."""

    def __init__(self, pids, own_network: bool):
        self.own_network = own_network
        self.table = _diag()
        self.copies: dict[int, socket.socket] = {}
        self.lock: str | None = None
        try:
            for pid in sorted(pids):
                for fd in procfs.fds(pid):
                    try:
                        ino = os.stat(procfs.path(pid, "fd", str(fd))).st_ino
                    except OSError:
                        continue
                    s = self.table.get(ino)
                    if s and s["proto"] == socket.IPPROTO_TCP and ino not in self.copies \
                            and TCP_STATES.get(s["state"]) in CONNECTED:
                        with borrowed(pid, fd) as copy:
                            self.copies[ino] = socket.socket(fileno=os.dup(copy))
            if self.copies:
                netlock.lift_stale()  # those of an hpccr killed, of images gone
                self.lock = netlock.lock([_connection(self.table[i]) for i in self.copies])
        except BaseException:
            self.close()
            raise

    def before_kill(self) -> None:
        """Repair mode on every connection: when the killed job's descriptors close, the
        kernel sends nothing (no FIN, no RST); the copies close last, in finish()."""
        for sock in self.copies.values():
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            except OSError:
                pass  # the image is complete: the kill must come, even if this one talks

    def finish(self, image: str | None) -> None:
        """The dump is over: the lock goes with `image` (the job was killed), or is lifted.
        A killed job's own network goes with it, and its lock with that."""
        self.close()
        lock, self.lock = self.lock, None
        if lock is None:
            return
        if image is None:
            netlock.unlock(lock)
        elif self.own_network:
            netlock.forget(lock)
        else:
            netlock.bind_to_image(lock, image)

    def close(self) -> None:
        for sock in self.copies.values():
            sock.close()
        self.copies.clear()


def _connection(s: dict) -> netlock.Connection:
    return netlock.Connection(s["family"], s["src"], s["sport"], s["dst"], s["dport"])


def _refuse(pid: int, fd: int, what: str) -> None:
    raise UnsupportedResource(f"process {pid} fd {fd} is {what}: not supported yet")


def _int(sock: socket.socket, level: int, name: int) -> int:
    return sock.getsockopt(level, name)


def _options(sock: socket.socket, family: int, proto: int) -> dict:
    sol = socket.SOL_SOCKET
    options = {
        "socket": {
            "reuseaddr": _int(sock, sol, socket.SO_REUSEADDR),
            "reuseport": _int(sock, sol, socket.SO_REUSEPORT),
            "keepalive": _int(sock, sol, socket.SO_KEEPALIVE),
            "broadcast": _int(sock, sol, socket.SO_BROADCAST),
            "oobinline": _int(sock, sol, socket.SO_OOBINLINE),
            "priority": _int(sock, sol, socket.SO_PRIORITY),
            "rcvbuf": _int(sock, sol, socket.SO_RCVBUF),
            "sndbuf": _int(sock, sol, socket.SO_SNDBUF),
            "rcvlowat": _int(sock, sol, socket.SO_RCVLOWAT),
            "linger": list(LINGER.unpack(sock.getsockopt(sol, socket.SO_LINGER, LINGER.size))),
            "rcvtimeo": list(TIMEVAL.unpack(sock.getsockopt(sol, socket.SO_RCVTIMEO,
                                                            TIMEVAL.size))),
            "sndtimeo": list(TIMEVAL.unpack(sock.getsockopt(sol, socket.SO_SNDTIMEO,
                                                            TIMEVAL.size)))},
        "ip": {"tos": _int(sock, socket.IPPROTO_IP, socket.IP_TOS), "v6only": None,
               "tclass": None},
        "tcp": None}
    if family == socket.AF_INET6:
        options["ip"]["v6only"] = _int(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        options["ip"]["tclass"] = _int(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
    if proto == socket.IPPROTO_TCP:
        tcp = socket.IPPROTO_TCP
        options["tcp"] = {
            "nodelay": _int(sock, tcp, socket.TCP_NODELAY),
            "cork": _int(sock, tcp, socket.TCP_CORK),
            "keepidle": _int(sock, tcp, socket.TCP_KEEPIDLE),
            "keepintvl": _int(sock, tcp, socket.TCP_KEEPINTVL),
            "keepcnt": _int(sock, tcp, socket.TCP_KEEPCNT),
            "user_timeout": _int(sock, tcp, TCP_USER_TIMEOUT),
            "notsent_lowat": _int(sock, tcp, TCP_NOTSENT_LOWAT)}
    return options


def dump(pid: int, fd: int, link: str, st: os.stat_result, state) -> dict:
    view = _view(state)
    s = view.table[st.st_ino]
    family, proto = FAMILIES[s["family"]], PROTOCOLS[s["proto"]]
    entry = {"socket": st.st_ino, "family": family, "proto": proto, "local": None,
             "remote": None, "backlog": None, "tcp": None, "lock": None}
    with borrowed(pid, fd) as copy:
        sock = socket.socket(fileno=os.dup(copy))
        try:
            entry["options"] = _options(sock, s["family"], s["proto"])
            local = sock.getsockname()
            if local[1]:
                entry["local"] = {"addr": local[0], "port": local[1]}
            if proto == "udp":
                entry["state"] = "connected" if s["dport"] else "unconnected"
                if s["dport"]:
                    entry["remote"] = {"addr": s["dst"], "port": s["dport"]}
                return entry
            where = TCP_STATES.get(s["state"])
            if where is None or where == "syn_sent":
                _refuse(pid, fd, f"a TCP socket in state {where or s['state']} (a connect "
                        "in progress)")
            entry["state"] = where
            if where == "listening":
                if s["rqueue"]:
                    _refuse(pid, fd, f"a TCP socket listening on port {s['sport']} with "
                            f"{s['rqueue']} connection(s) waiting to be accepted")
                entry["backlog"] = s["wqueue"]
            elif where in CONNECTED:
                entry["remote"] = {"addr": s["dst"], "port": s["dport"]}
                entry["tcp"] = _dump_connection(sock, pid, fd, where, state)
                entry["lock"] = view.lock
        finally:
            sock.close()
    return entry


def _tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(tcpi_options, snd_wscale, rcv_wscale) from TCP_INFO."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[5], info[6] & 0xF, info[6] >> 4


def _dump_connection(sock: socket.socket, pid: int, fd: int, where: str, state) -> dict:
    """Sequence numbers, options, window and both queues, read in repair mode."""
    tcp = socket.IPPROTO_TCP
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 0 and _has_urgent(sock):
        _refuse(pid, fd, "a TCP connection with urgent data queued")
    sock.setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        options, snd_wscale, rcv_wscale = _tcp_info(sock)
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        write_seq = sock.getsockopt(tcp, TCP_QUEUE_SEQ)
        send = _peek_queue(sock, fcntl.ioctl(sock, SIOCOUTQ, b"\0" * 4))
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_nxt = sock.getsockopt(tcp, TCP_QUEUE_SEQ)
        recv = _peek_queue(sock, fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        saved = {
            "snd_seq": write_seq & (SEQ - 1), "rcv_seq": rcv_nxt & (SEQ - 1),
            "mss": sock.getsockopt(tcp, socket.TCP_MAXSEG),
            "snd_wscale": snd_wscale if options & TCPI_OPT_WSCALE else -1,
            "rcv_wscale": rcv_wscale if options & TCPI_OPT_WSCALE else -1,
            "timestamps": bool(options & TCPI_OPT_TIMESTAMPS),
            "sack": bool(options & TCPI_OPT_SACK),
            "timestamp": sock.getsockopt(tcp, TCP_TIMESTAMP) & (SEQ - 1),
            "window": list(REPAIR_WINDOW.unpack(sock.getsockopt(tcp, TCP_REPAIR_WINDOW,
                                                                REPAIR_WINDOW.size))),
            "fin_sent": where in FIN_SENT, "fin_received": where in FIN_RECEIVED,
            "send": None, "recv": None}
    finally:
        sock.setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    ino = os.fstat(sock.fileno()).st_ino
    for queue, data in (("send", send), ("recv", recv)):
        if data:
            saved[queue] = f"tcp-{ino}-{queue}.img"
            state.writer.write_bytes(saved[queue], data)
    return saved


def _has_urgent(sock: socket.socket) -> bool:
    """Is urgent (out-of-band) data waiting to be read?"""
    try:
        sock.recv(1, socket.MSG_OOB | socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return True


def _peek_queue(sock: socket.socket, size: bytes) -> bytes:
    """The whole queue selected with TCP_REPAIR_QUEUE, left in place."""
    (length,) = struct.unpack("i", size)
    if length <= 0:
        return b""
    out = bytearray()
    while len(out) < length:  # one call returns what one pass over the queue gives
        chunk = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(chunk) <= len(out):
            break
        out = bytearray(chunk)
    return bytes(out)


def check(entry: dict, ctx) -> None:
    fd = entry["fd"]
    if entry["family"] not in FAMILY_NUMBERS or entry["proto"] not in SOCK_TYPES:
        raise ImageCorrupt(f"fd {fd}: unknown network socket family or protocol "
                           "(image corrupted)")
    connected = entry["proto"] == "tcp" and entry["state"] in CONNECTED
    if connected != (entry["tcp"] is not None) or connected and (
            entry["local"] is None or entry["remote"] is None):
        raise ImageCorrupt(f"fd {fd}: inconsistent TCP socket entry (image corrupted)")
    if entry["tcp"] is not None and len(entry["tcp"]["window"]) != 5:
        raise ImageCorrupt(f"fd {fd}: TCP window of the wrong size (image corrupted)")


def describe(entry: dict) -> str:
    """A person's name for the socket, for messages: 'TCP 127.0.0.1:5000 -> 127.0.0.1:4000'."""
    def text(end):
        if end is None:
            return "*"
        addr = end["addr"]
        return f"[{addr}]:{end['port']}" if ":" in addr else f"{addr}:{end['port']}"
    where = f"{text(entry['local'])} -> {text(entry['remote'])}" if entry["remote"] \
        else text(entry["local"])
    return f"{entry['proto'].upper()} {where}"


def open(entry: dict, ctx, pool) -> int:  # noqa: A001 - the kind interface
    """Runs in the restorer: the socket, bound, listening or connected as saved."""
    family = FAMILY_NUMBERS[entry["family"]]
    sock = socket.socket(family, SOCK_TYPES[entry["proto"]])
    try:
        if entry["tcp"] is not None:
            try:
                _connect_repaired(sock, entry, ctx)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or not pool.tcp_close:
                    raise _cannot(entry, exc) from None
                sock.close()
                sock = _reset_connection(family)
            else:
                pool.repairing.append((sock.dup(), entry["options"]["socket"]["reuseaddr"]))
        else:
            _open_plain(sock, entry)
        _set_options(sock, entry["options"], family)
        sock.setblocking(not entry["flags"] & os.O_NONBLOCK)
        return sock.detach()
    finally:
        sock.close()


def _cannot(entry: dict, exc: OSError) -> RestoreFailed:
    if exc.errno == errno.EADDRNOTAVAIL:
        return RestoreFailed(f"{describe(entry)}: its local address does not exist here (another "
                            "node?); restore with --tcp-close to have it come back closed")
    if exc.errno == errno.EADDRINUSE:
        return RestoreFailed(f"{describe(entry)}: the address is in use (is the checkpointed "
                             "job still running here?)")
    return RestoreFailed(f"{describe(entry)}: {exc.strerror or exc}")


def _clear_time_wait(entry: dict) -> None:
    """Destroy (sock_diag SOCK_DESTROY) the TIME_WAIT sockets that the checkpointed job's own
    connections left on this TCP socket's local address and port (all of them for a listener,
    the one of its 4-tuple for a connection), when it ran on here after its checkpoint and
    closed them: they would keep the restored ones from binding or connecting for a minute."""
    family, local, remote = FAMILY_NUMBERS[entry["family"]], entry["local"], entry["remote"]
    with netlink.DiagSocket() as ds:
        ds.bind()
        for m in ds.get_sock_stats(family=family, protocol=socket.IPPROTO_TCP,
                                   states=1 << netlink.SS_TIME_WAIT):
            if (m["idiag_src"], m["idiag_sport"]) != (local["addr"], local["port"]) or \
                    remote and (m["idiag_dst"], m["idiag_dport"]) != (remote["addr"],
                                                                    remote["port"]):
                continue
            req = netlink.inet_diag_req()
            req["sdiag_family"], req["sdiag_protocol"] = family, socket.IPPROTO_TCP
            req["idiag_states"] = 1 << netlink.SS_TIME_WAIT
            req["idiag_sport"], req["idiag_dport"] = m["idiag_sport"], m["idiag_dport"]
            req["idiag_src"] = _words(family, m["idiag_src"])
            req["idiag_dst"] = _words(family, m["idiag_dst"])
            req["idiag_if"], req["idiag_cookie"] = 0, (1 << 64) - 1  # any cookie
            list(ds.nlm_request(req, netlink.SOCK_DESTROY,
                                netlink.NLM_F_REQUEST | netlink.NLM_F_ACK))


def _words(family: int, address: str) -> tuple[int, ...]:
    """An address as inet_diag_sockid holds it: four big-endian 32-bit words."""
    raw = socket.inet_pton(family, address)
    return struct.unpack(">4I", raw + bytes(16 - len(raw)))


def _open_plain(sock: socket.socket, entry: dict) -> None:
    """A socket that is not a TCP connection: bound, listening or (UDP) connected."""
    try:
        if entry["local"] is not None:
            if entry["proto"] == "tcp":  # a port the dead job's connections still hold
                _clear_time_wait(entry)
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            _before_bind(sock, entry)
            sock.bind((entry["local"]["addr"], entry["local"]["port"]))
            if entry["proto"] == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        if entry["state"] == "listening":
            # Its accepted connections may hold the port already (in repair mode); the saved
            # SO_REUSEADDR is set again afterwards.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.listen(entry["backlog"])
        elif entry["remote"] is not None:
            sock.connect((entry["remote"]["addr"], entry["remote"]["port"]))
    except OSError as exc:
        raise _cannot(entry, exc) from None


def _before_bind(sock: socket.socket, entry: dict) -> None:
    """The options that act at bind: IPV6_V6ONLY, and SO_REUSEPORT (a group of listeners)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT,
                    entry["options"]["socket"]["reuseport"])
    if entry["options"]["ip"]["v6only"] is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                        entry["options"]["ip"]["v6only"])


def _connect_repaired(sock: socket.socket, entry: dict, ctx) -> None:
    """The connection of `entry`, established in repair mode without a packet, queues and
    all; it stays in repair mode until Pool.end_repair()."""
    tcp, saved = socket.IPPROTO_TCP, entry["tcp"]
    send = _queue(ctx, saved["send"])
    recv = _queue(ctx, saved["recv"])
    _clear_time_wait(entry)
    sock.setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_ON)
    _before_bind(sock, entry)
    sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    sock.setsockopt(tcp, TCP_QUEUE_SEQ, _seq(saved["snd_seq"] - saved["fin_sent"] - len(send)))
    sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    sock.setsockopt(tcp, TCP_QUEUE_SEQ, _seq(saved["rcv_seq"] - len(recv)))
    sock.bind((entry["local"]["addr"], entry["local"]["port"]))
    sock.connect((entry["remote"]["addr"], entry["remote"]["port"]))
    options = [(TCPOPT_MSS, saved["mss"])]
    if saved["snd_wscale"] >= 0:
        options.append((TCPOPT_WINDOW, saved["snd_wscale"] | saved["rcv_wscale"] << 16))
    if saved["sack"]:
        options.append((TCPOPT_SACK_PERM, 0))
    if saved["timestamps"]:
        options.append((TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(tcp, TCP_REPAIR_OPTIONS, b"".join(REPAIR_OPT.pack(*o) for o in options))
    if saved["timestamps"]:
        sock.setsockopt(tcp, TCP_TIMESTAMP, struct.pack("I", saved["timestamp"]))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(FILL_BUF, 2 * len(recv)))
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(FILL_BUF, 2 * len(send)))
    for queue, data in ((TCP_RECV_QUEUE, recv), (TCP_SEND_QUEUE, send)):
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
        view = memoryview(data)
        while view:
            view = view[sock.send(view):]
    sock.setsockopt(tcp, TCP_REPAIR_WINDOW, REPAIR_WINDOW.pack(*saved["window"]))
    if saved["fin_sent"]:  # with the send queue selected: the FIN counts as sent, too
        sock.shutdown(socket.SHUT_WR)
    if saved["fin_received"]:
        sock.shutdown(socket.SHUT_RD)
    sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def _seq(value: int) -> int:
    """A 32-bit sequence number as setsockopt takes it (a C int)."""
    value %= SEQ
    return value - SEQ if value >= SEQ >> 1 else value


def _queue(ctx, name: str | None) -> bytes:
    if name is None:
        return b""
    with ctx.owner_rights():
        return saved_data(ctx, name)


def _reset_connection(family: int) -> socket.socket:
    """A TCP socket whose connection was reset: its next read or write fails with
    ECONNRESET, as after a network failure.  Made on loopback: the peer aborts at once."""
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((loopback, 0))
        listener.listen(1)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(listener.getsockname())
        accepted, _ = listener.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER.pack(1, 0))
        accepted.close()  # sends the reset
    return sock


def _set_options(sock: socket.socket, options: dict, family: int) -> None:
    sol, so = socket.SOL_SOCKET, options["socket"]
    for name, value in (("keepalive", so["keepalive"]),
                        ("broadcast", so["broadcast"]), ("oobinline", so["oobinline"]),
                        ("priority", so["priority"]), ("rcvlowat", so["rcvlowat"])):
        sock.setsockopt(sol, getattr(socket, f"SO_{name.upper()}"), value)
    sock.setsockopt(sol, socket.SO_REUSEADDR, so["reuseaddr"])
    sock.setsockopt(sol, SO_RCVBUFFORCE, so["rcvbuf"] // 2)
    sock.setsockopt(sol, SO_SNDBUFFORCE, so["sndbuf"] // 2)
    sock.setsockopt(sol, socket.SO_LINGER, LINGER.pack(*so["linger"]))
    sock.setsockopt(sol, socket.SO_RCVTIMEO, TIMEVAL.pack(*so["rcvtimeo"]))
    sock.setsockopt(sol, socket.SO_SNDTIMEO, TIMEVAL.pack(*so["sndtimeo"]))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, options["ip"]["tos"])
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, options["ip"]["tclass"])
    tcp = options["tcp"]
    if tcp is not None:
        for name, number in (("nodelay", socket.TCP_NODELAY), ("cork", socket.TCP_CORK),
                             ("keepidle", socket.TCP_KEEPIDLE),
                             ("keepintvl", socket.TCP_KEEPINTVL),
                             ("keepcnt", socket.TCP_KEEPCNT),
                             ("user_timeout", TCP_USER_TIMEOUT),
                             ("notsent_lowat", TCP_NOTSENT_LOWAT)):
            sock.setsockopt(socket.IPPROTO_TCP, number, tcp[name])


def end_repair(repairing: list[tuple[socket.socket, int]]) -> None:
    """Repair mode off on every restored connection, just before the tree runs: the kernel
    sends a window probe and retransmits what the send queues hold.  Leaving repair mode
    resets SO_REUSEADDR, which is then set again."""
    while repairing:
        sock, reuseaddr = repairing.pop()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)
        finally:
            sock.close()


def locks_of(entries) -> set[str]:
    """The network locks the image's connections are held by."""
    return {e["lock"] for e in entries if e["kind"] == NAME and e["lock"]}
