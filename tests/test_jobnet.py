"""A job's own network (hpccr run): its own host name and address, which resolve to each other
inside the job, reach the node, are reached from the node, and stay the same across a
checkpoint and restore, with a connection from outside kept; nothing of it (link, NAT table)
outlives the job, also when hpccr was killed.  `--network host` keeps the node's network.

Workload: workloads/net_job.py NODE NODE_PORT PORT.
"""

import ipaddress
import os
import signal
import socket

import pytest
from harness import TIMEOUT, WORKLOADS, pid_alive, wait_until
from pyroute2 import IPRoute

from hpccr.engine import netns, nftables

SUBNET = ipaddress.IPv4Network("10.199.0.0/16")  # etc/hpccr.toml's job_subnet
PORT = 7177
PYTHON = "/usr/bin/python3"


def node_address() -> str:
    """An IPv4 address of this node that a job can reach (not loopback, not a job's link)."""
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            address = ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS"))
            if not address.is_loopback and not address.is_link_local and address not in SUBNET:
                return str(address)
    pytest.skip("this machine has no IPv4 address besides loopback")


def links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                if link.get_attr("IFLA_IFNAME").startswith(netns.LINK_PREFIX)}


def nat_tables() -> set[str]:
    with nftables.netfilter("listing tables") as nft:
        return set(nftables.table_names(nft, netns.TABLE_PREFIX))


def nat_table(address: str) -> str:
    return netns.TABLE_PREFIX + netns.link_name(address).removeprefix(netns.LINK_PREFIX)


def assert_removed(address: str) -> None:
    """Nothing of the network of the job at `address` is left on the node."""
    assert netns.link_name(address) not in links(), "the job's link outlived it"
    assert nat_table(address) not in nat_tables(), "the job's NAT table outlived it"


class Hello:
    """The test's server on the node: the job connects and says hello when it starts."""

    def __init__(self):
        self.listener = socket.create_server((node_address(), 0))
        self.listener.settimeout(TIMEOUT)
        self.address, self.port = self.listener.getsockname()

    def greeted_by(self) -> str:
        """The address the job's hello came from."""
        conn, (peer, _) = self.listener.accept()
        with conn:
            assert conn.makefile().readline() == "hello\n"
        return peer

    def close(self):
        self.listener.close()


@pytest.fixture
def hello():
    server = Hello()
    yield server
    server.close()


def start(tree_cr, hello, *options):
    return tree_cr.start_job([PYTHON, WORKLOADS / "net_job.py", hello.address, hello.port, PORT],
                             *options)


def ask(peer, count: int, asked: bool = False) -> list[str]:
    if not asked:
        peer.write("?\n")
        peer.flush()
    answer = peer.readline().split()
    assert answer and int(answer[0]) == count, answer
    return answer[1:]


def test_own_network(tree_cr, hello):
    """Its own host name and address (of the site's subnet), which resolve to each other in
    the job; it reaches the node from that address (no NAT on the node) and is reached there;
    when it ends, its link and NAT table are gone."""
    job = start(tree_cr, hello)
    assert hello.greeted_by() == job.values("ADDR")[0]
    host, address = job.values("HOST")[0], job.values("ADDR")[0]
    assert host != socket.gethostname()
    assert ipaddress.IPv4Address(address) in SUBNET
    assert job.values("RESOLVED") == [address]
    assert netns.link_name(address) in links()
    with socket.create_connection((address, PORT), timeout=TIMEOUT) as conn, \
            conn.makefile("rw") as peer:
        assert ask(peer, 1) == [host, address]
        peer.write("end\n")
        peer.flush()
    assert job.wait_exit() == 0, job.output()
    job.assert_passed()
    assert_removed(address)


def test_same_network_after_restore(tree_cr, hello, tmp_path):
    """Dumped (killed) with a client on the node connected: restored, the job has the same
    host name and address, and the same connection goes on; then nothing is left.  The client
    asks as soon as the restore has made the job's link, before the connection is back: no
    reset may answer (nor its retransmissions, which meet the restore at any step)."""
    job = start(tree_cr, hello)
    hello.greeted_by()
    host, address = job.values("HOST")[0], job.values("ADDR")[0]
    with socket.create_connection((address, PORT), timeout=TIMEOUT) as conn, \
            conn.makefile("rw") as peer:
        assert ask(peer, 1) == [host, address]
        tree_cr.dump_and_kill(job, tmp_path / "img")
        wait_until(lambda: netns.link_name(address) not in links(), "the job's link to go")
        proc, _ = tree_cr.start_restore(tmp_path / "img")
        wait_until(lambda: netns.link_name(address) in links() or proc.poll() is not None,
                   "the restore to make the job's link")
        peer.write("?\n")
        peer.flush()
        assert ask(peer, 2, asked=True) == [host, address]
        peer.write("end\n")
        peer.flush()
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read() if proc.stderr else ""
    job.assert_passed()
    assert_removed(address)


def test_host_network(tree_cr, hello):
    """--network host: the node's host name and addresses, as without hpccr."""
    job = start(tree_cr, hello, "--network", "host")
    assert job.values("HOST") == [socket.gethostname()]
    assert hello.greeted_by() == hello.address
    with socket.create_connection(("127.0.0.1", PORT), timeout=TIMEOUT) as conn, \
            conn.makefile("rw") as peer:
        ask(peer, 1)
        peer.write("end\n")
        peer.flush()
    assert job.wait_exit() == 0, job.output()


def test_network_of_a_killed_hpccr_is_removed(tree_cr, hello):
    """hpccr run and its job killed (SIGKILL): the kernel removes the link with the job's
    namespace; the NAT table left is removed when the next job network is made."""
    job = start(tree_cr, hello)
    hello.greeted_by()
    table = nat_table(job.values("ADDR")[0])
    assert table in nat_tables()
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait(timeout=TIMEOUT)
    os.kill(job.job_pid, signal.SIGKILL)  # pid 1 of its namespace: the whole job ends
    wait_until(lambda: not pid_alive(job.job_pid), "the job to end")
    wait_until(lambda: netns.link_name(job.values("ADDR")[0]) not in links(),
               "the kernel to remove the job's link")
    assert table in nat_tables()
    netns.lift_stale()
    assert table not in nat_tables()
