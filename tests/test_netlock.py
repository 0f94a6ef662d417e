"""Network locks (hpccr/engine/netlock.py) on the real kernel, with TCP connections between two
loopback sockets of this process: a locked connection carries nothing either way, not even the
RST of a peer that aborts, until it is unlocked, when TCP delivers what it held back; another
connection between the same addresses is untouched.  lift_stale lifts the locks of a killed
owner, of a pid reused by another process and of a removed image, and leftovers of either half
(table or record); it keeps the locks of a living owner and of an existing image.  Without
CAP_NET_ADMIN, lock fails with one line and leaves no record.

Every wait is for an event: the data or the RST of a control connection sent after the locked
one's, or the sender's own retry (TCP_INFO backoff), which shows that the kernel resent and the
resent copy was dropped too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from harness import REPO, TIMEOUT, cli_env, describe, wait_until
from pyroute2.netlink.nfnetlink.nftsocket import NFPROTO_INET
from pyroute2.nftables.main import NFTables

from hpccr.engine import netlock

DELIVERY_TIMEOUT = 10  # seconds: TCP resends held-back data within about 1.5 s
LOCKING_CHILD = """
import sys
from hpccr.engine import netlock
print(netlock.lock([]), flush=True)
sys.stdin.read()
"""
REFUSED_CHILD = """
import socket
from hpccr.engine import netlock
from hpccr.errors import DumpFailed
try:
    netlock.lock([netlock.Connection(socket.AF_INET, "127.0.0.1", 9, "127.0.0.1", 9)])
except DumpFailed as exc:
    print(exc)
"""


@pytest.fixture(autouse=True)
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry of the test's own (hpccr dumps running beside keep theirs); afterwards every
    lock of it is made stale and lifted, leaving no table behind."""
    directory = tmp_path / "netlocks"
    monkeypatch.setenv("HPCCR_NETLOCK_DIR", str(directory))
    yield directory
    for record in directory.glob("*.json"):
        record.unlink()
    netlock.lift_stale()


class Loopback:
    """TCP connections to one listening socket on a loopback address, closed after the test."""

    def __init__(self, family: int, host: str):
        self.family = family
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:  # an IPv4-mapped host needs a dual-stack socket
            self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.listener.bind((host, 0))
        self.listener.listen()
        self.sockets = [self.listener]

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """A new connection: (client, accepted)."""
        client = socket.socket(self.family, socket.SOCK_STREAM)
        self.sockets.append(client)
        client.connect(self.listener.getsockname())
        server, _ = self.listener.accept()
        self.sockets.append(server)
        return client, server

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                        (socket.AF_INET6, "::ffff:127.0.0.1")], ids=["ipv4", "ipv6", "mapped"])
def loopback(request) -> Loopback:
    connections = Loopback(*request.param)
    yield connections
    connections.close()


def connection(sock: socket.socket) -> netlock.Connection:
    """The connection as `sock` sees it."""
    local, local_port = sock.getsockname()[:2]
    remote, remote_port = sock.getpeername()[:2]
    return netlock.Connection(sock.family, local, local_port, remote, remote_port)


def receive(sock: socket.socket) -> bytes:
    """The next bytes arriving on `sock` (raises what the connection reports instead)."""
    sock.settimeout(DELIVERY_TIMEOUT)
    try:
        return sock.recv(64)
    finally:
        sock.settimeout(None)


def assert_nothing_arrived(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.recv(64, socket.MSG_DONTWAIT)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes `sock` sent (or means to) that its peer has not acknowledged (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def retried(sock: socket.socket) -> bool:
    """Has `sock` had to send again (tcpi_backoff of struct tcp_info)?"""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[4] > 0


def test_locked_connection_carries_nothing_until_unlocked(loopback):
    client, server = loopback.connect()
    lock_id = netlock.lock([connection(client)])
    assert lock_id in netlock.held()
    client.send(b"ping")
    server.send(b"pong")
    wait_until(lambda: retried(client) and retried(server), "both ends to send again",
               DELIVERY_TIMEOUT)
    for sock in (client, server):
        assert unacknowledged(sock) == 4
        assert_nothing_arrived(sock)

    netlock.unlock(lock_id)
    assert lock_id not in netlock.held()
    assert receive(server) == b"ping"
    assert receive(client) == b"pong"
    wait_until(lambda: unacknowledged(client) == unacknowledged(server) == 0, "the acks")


def test_other_connection_between_the_same_addresses_flows(loopback):
    locked_client, locked_server = loopback.connect()
    client, server = loopback.connect()
    netlock.lock([connection(locked_client)])
    locked_client.send(b"held")
    locked_server.send(b"held")
    client.send(b"ping")
    server.send(b"pong")
    assert receive(server) == b"ping"
    assert receive(client) == b"pong"
    assert_nothing_arrived(locked_server)
    assert_nothing_arrived(locked_client)


def test_reset_of_an_aborting_peer_is_dropped(loopback):
    locked_client, locked_server = loopback.connect()
    client, server = loopback.connect()
    lock_id = netlock.lock([connection(locked_client)])
    for sock in (locked_server, server):  # close with a RST (SO_LINGER {1, 0})
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with pytest.raises(ConnectionResetError):
        receive(client)
    assert_nothing_arrived(locked_client)

    netlock.unlock(lock_id)
    locked_client.send(b"ping")  # the peer's kernel answers with a RST again, which now arrives
    with pytest.raises(ConnectionResetError):
        receive(locked_client)


def test_lift_stale(registry, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", LOCKING_CHILD], cwd=REPO, env=cli_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    killed_owner = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait(TIMEOUT)
    # Its watchdog lifts its lock with a lift_stale of its own: once that is done, it cannot
    # also take the stale locks made below (the registry's flock orders them).
    wait_until(lambda: not (registry / f"{killed_owner}.json").exists(),
               "the killed owner's watchdog to lift its lock")
    living_owner = netlock.lock([])
    reused_pid = netlock.lock([])
    record = json.loads((registry / f"{reused_pid}.json").read_text())
    record["owner_start"] += 1  # as if another process had started since with that pid
    (registry / f"{reused_pid}.json").write_text(json.dumps(record))
    image = tmp_path / "image"
    image.mkdir()
    bound = netlock.lock([])
    netlock.bind_to_image(bound, str(image))
    no_record = netlock.lock([])
    (registry / f"{no_record}.json").unlink()
    no_table = netlock.lock([])
    with NFTables(nfgen_family=NFPROTO_INET) as nft:
        nft.table("del", name=f"hpccr_lock_{no_table}")

    assert netlock.lift_stale() == sorted([reused_pid, no_record, no_table])
    assert set(netlock.held()) >= {living_owner, bound}
    assert not set(netlock.held()) & {killed_owner, reused_pid, no_record}
    assert sorted(path.stem for path in registry.glob("*.json")) == sorted([living_owner, bound])

    image.rmdir()
    assert netlock.lift_stale() == [bound]
    assert bound not in netlock.held()
    assert netlock.lift_stale() == []
    netlock.unlock(living_owner)


def test_unknown_id_and_empty_lock(registry):
    netlock.unlock("0123abcd")
    netlock.unlock("../not-an-id")
    lock_id = netlock.lock([])
    assert lock_id in netlock.held()
    assert stat.S_IMODE(registry.stat().st_mode) == 0o700
    record = json.loads((registry / f"{lock_id}.json").read_text())
    assert (record["owner_pid"], record["image"], record["connections"]) == (os.getpid(), None, [])
    netlock.unlock(lock_id)
    netlock.unlock(lock_id)
    assert lock_id not in netlock.held()
    assert not (registry / f"{lock_id}.json").exists()


def test_refused_lock_fails_cleanly(registry):
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN")
    res = subprocess.run([setpriv, "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                          sys.executable, "-c", REFUSED_CHILD], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, describe(res)
    assert res.stdout.splitlines() == [
        "cannot lock the TCP connections: nftables: Operation not permitted"], describe(res)
    assert not list(registry.glob("*.json"))
