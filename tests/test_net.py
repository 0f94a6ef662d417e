"""Network sockets: TCP connections (both ends in the tree, or a server outside it) with data in
flight both ways and half-closed, listeners, UDP; IPv4, IPv6 and v4-mapped; dumped and
restored, left running, twice in a row; a dump that fails half-way leaves every connection
working; while a dumped job is down its connections are locked (netfilter drops their
packets: the outside peer sees no reset), and the lock is lifted by the restore.  A connection
whose local address is gone at restore (another node) fails the restore, naming it, or comes
back reset with --tcp-close.

Workloads: workloads/net_tcp.c v4|v6|mapped flight|halfclosed [userfaultfd] (a tree: a server and
its client, with a UDP pair), net_client.c ADDRESS PORT [SOURCE] [reset] (a client of the
test's own server), net_server.c ADDRESS (a server of the test's own client).  Each checks
every byte received, its addresses and its options.
"""

import errno
import json
import select
import socket
import threading
from pathlib import Path

import pytest
from harness import TIMEOUT, describe, pid_alive, wait_until
from pyroute2 import IPRoute

from hpccr.engine import netlock

FAMILIES = ["v4", "v6", "mapped"]
CLIENT_TOTAL = 1 << 20  # net_client.c's TOTAL
# An address of this machine only (unique local, on loopback) that a test can take away, as if
# the job were restored on another node.
LEAVING_ADDRESS = "fdcc:7e57:4ccc::1"


def image_locks(directory: Path) -> set[str]:
    """The network locks named by the images under `directory`."""
    return {fd["lock"] for meta in directory.rglob("image.json")
            for proc in json.loads(meta.read_text())["processes"]
            for fd in proc.get("fds", []) if fd["kind"] == "inet" and fd["lock"]}


@pytest.fixture(autouse=True)
def no_lock_left(tmp_path):
    """Every lock a test's dumps took is lifted by the end of it (restores lift theirs)."""
    yield
    left = image_locks(tmp_path) & set(netlock.held())
    for lock in left:
        netlock.unlock(lock)
    assert not left, f"network locks left behind: {left}"


def start(cr, what: str, family: str = "v4", *extra: str):
    return cr.start(cr.binaries["net_tcp"], family, what, *extra, append=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("what", ["flight", "halfclosed"])
def test_checkpoint_restart(tree_cr, tmp_path, family, what):
    """Killed by the dump, restored: every byte in flight arrives, once, in order."""
    workload = start(tree_cr, what, family)
    tree_cr.dump_and_kill(workload, tmp_path / "img")
    locks = image_locks(tmp_path / "img")
    assert len(locks) == 1 and locks <= set(netlock.held()), "the connections are not locked"
    tree_cr.restore_and_pass(workload, tmp_path / "img")
    assert not locks & set(netlock.held()), "the restore did not lift the lock"


@pytest.mark.parametrize("what", ["flight", "halfclosed"])
def test_leave_running(tree_cr, tmp_path, what):
    """The original runs on and passes (nothing consumed, no lock left); then the image
    restores and passes too."""
    workload = start(tree_cr, what)
    res = tree_cr.dump(workload, tmp_path / "img", "--leave-running")
    assert res.returncode == 0, describe(res)
    assert not image_locks(tmp_path / "img") & set(netlock.held()), "a lock outlived the dump"
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()
    tree_cr.restore_and_pass(workload, tmp_path / "img", passes=2)


def test_job_restored_twice(tree_cr, tmp_path):
    """A job under hpccr run, dumped: restored, it runs to its end (and closes its
    connections); the same image restored again, over what those left (TIME_WAIT), passes
    again."""
    job = tree_cr.start_job([tree_cr.binaries["net_tcp"], "v4", "flight"])
    tree_cr.dump_and_kill(job, tmp_path / "img")
    tree_cr.restore_and_pass(job, tmp_path / "img")
    tree_cr.restore_and_pass(job, tmp_path / "img", passes=2)


def test_failed_dump_leaves_connections_working(tree_cr, tmp_path):
    """The root also holds a userfaultfd: the dump reads its connection, then refuses
    (14) and leaves everything as it was: no image, no lock, and both ends go on to pass."""
    workload = start(tree_cr, "flight", "v4", "userfaultfd")
    before = set(netlock.held())
    res = tree_cr.dump(workload, tmp_path / "img")
    message = tree_cr.assert_error(res, 14)
    assert "userfaultfd" in message, message
    assert not (tmp_path / "img").exists()
    assert set(netlock.held()) <= before, "a lock outlived the dump"
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


class Peer:
    """The test's end of a TCP connection with a workload: it exchanges CLIENT_TOTAL bytes each
    way with it when told to (seeds 8 and 7, as net_client.c and net_server.c)."""

    def __init__(self, conn: socket.socket | None = None):
        self.conn = conn
        self.errors: list[str] = []

    def send_some(self, data: bytes) -> int:
        """Send without blocking what fits now (while the workload is down: dropped by the
        lock, retransmitted later); a reset here would be a failure."""
        try:
            return self.conn.send(data)
        except BlockingIOError:
            return 0

    def exchange(self, data: bytes, expected: bytes, sent: int) -> None:
        got = bytearray()
        while len(got) < len(expected) or sent < len(data):
            want_write = [self.conn] if sent < len(data) else []
            readable, writable, _ = select.select([self.conn], want_write, [], TIMEOUT)
            if not readable and not writable:
                self.errors.append(f"stuck after {len(got)} bytes received, {sent} sent")
                return
            if writable:
                sent += self.send_some(data[sent:])
            if readable:
                chunk = self.conn.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        if bytes(got) != expected:
            self.errors.append(f"received {len(got)} bytes, not the {len(expected)} sent")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Server(Peer):
    """The test's own TCP server, outside the dumped tree, for one client."""

    def __init__(self, address: str):
        super().__init__()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        # Small, so that the client's bytes wait in both queues (accepted sockets inherit it).
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.listener.bind((address, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]

    def accept(self) -> None:
        self.listener.settimeout(TIMEOUT)
        self.conn, _ = self.listener.accept()
        self.conn.setblocking(False)

    def close(self) -> None:
        super().close()
        self.listener.close()


def stream(seed: int, size: int) -> bytes:
    """wl_fill(seed) of workloads/wl.h: xorshift64* words, little-endian."""
    state, out, mask = seed | 1, bytearray(), (1 << 64) - 1
    for _ in range(size // 8):
        state ^= state >> 12
        state = (state ^ (state << 25)) & mask
        state ^= state >> 27
        out += ((state * 0x2545F4914F6CDD1D) & mask).to_bytes(8, "little")
    return bytes(out)


@pytest.fixture(scope="module")
def client_streams() -> tuple[bytes, bytes]:
    """(what the server sends, what the client sends), as the workloads make them."""
    return stream(8, CLIENT_TOTAL), stream(7, CLIENT_TOTAL)


def test_server_outside_the_job(cr, tmp_path, client_streams):
    """The client is dumped (killed) while its server, outside, runs on and sends: the lock
    drops the packets, so the server gets no reset (which would end the exchange); after the
    restore every byte of both streams arrives."""
    to_client, from_client = client_streams
    server = Server("127.0.0.1")
    try:
        workload = cr.start("net_client", "127.0.0.1", server.port)
        server.accept()
        cr.dump_and_kill(workload, tmp_path / "img")
        sent = server.send_some(to_client)  # without the lock: answered with a reset
        assert sent > 0
        exchange = threading.Thread(target=server.exchange,
                                    args=(to_client, from_client, sent))
        exchange.start()
        cr.restore_and_pass(workload, tmp_path / "img")
        exchange.join(TIMEOUT)
        assert not server.errors, server.errors
    finally:
        server.close()


@pytest.fixture
def leaving_address():
    """LEAVING_ADDRESS on loopback for the test; gone at its end (if not before)."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.addr("add", index=lo, address=LEAVING_ADDRESS, prefixlen=128, flags=0x80)

        def remove() -> None:
            try:
                ipr.addr("del", index=lo, address=LEAVING_ADDRESS, prefixlen=128)
            except Exception as exc:  # pyroute2's NetlinkError: already gone
                if getattr(exc, "code", None) != errno.EADDRNOTAVAIL:
                    raise

        yield remove
        remove()


def test_local_address_gone(cr, tmp_path, leaving_address):
    """The client's local address does not exist at restore (as on another node): the restore
    fails naming the connection and leaves nothing running; with --tcp-close it comes back
    reset (the client's next read gets ECONNRESET) and the job goes on."""
    server = Server("::1")
    try:
        workload = cr.start("net_client", "::1", server.port, LEAVING_ADDRESS, "reset")
        server.accept()
        cr.dump_and_kill(workload, tmp_path / "img")
        leaving_address()
        res = cr.restore(tmp_path / "img")
        message = cr.assert_error(res, 19)
        assert f"[{LEAVING_ADDRESS}]:" in message and "--tcp-close" in message, message
        assert not pid_alive(workload.pid)
        res = cr.restore(tmp_path / "img", "--tcp-close")
        assert res.returncode == 0, describe(res) + "\nlog:\n" + workload.output()
        workload.assert_passed()
    finally:
        server.close()


def test_client_outside_the_job(cr, tmp_path, client_streams):
    """The server is in the dumped tree, its client outside (the test): the server is dumped
    (killed) while the client sends; after the restore every byte of both streams arrives, and
    the listener accepts a new connection."""
    from_server, to_server = client_streams
    log, client = tmp_path / "net_server.log", Peer()

    def port() -> int | None:
        lines = log.read_text().splitlines() if log.exists() else []
        return next((int(line.split()[1]) for line in lines if line.startswith("PORT ")), None)

    def connect() -> None:  # the server prints its port, then waits for us before READY
        wait_until(lambda: port() is not None, "the server's port")
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        conn.connect(("127.0.0.1", port()))
        conn.setblocking(False)
        client.conn = conn

    connecting = threading.Thread(target=connect)
    connecting.start()
    try:
        workload = cr.start("net_server", "127.0.0.1")
        connecting.join(TIMEOUT)
        cr.dump_and_kill(workload, tmp_path / "img")
        sent = client.send_some(to_server)  # without the lock: answered with a reset
        exchange = threading.Thread(target=client.exchange, args=(to_server, from_server, sent))
        exchange.start()
        restore = cr.restore_in_background(tmp_path / "img")
        exchange.join(TIMEOUT)
        assert not client.errors, client.errors
        socket.create_connection(("127.0.0.1", port()), timeout=TIMEOUT).close()
        out, err = restore.communicate(timeout=TIMEOUT)
        assert restore.returncode == 0, (out, err, workload.output())
        workload.assert_passed()
    finally:
        connecting.join(TIMEOUT)
        client.close()
