"""Two "nodes" on this machine for the tests of jobs on several nodes: network namespaces joined
by a bridge, as the Slurm test bed's, each with an address of UNDERLAY.  hpccr runs and
restores a job's part on a node inside its namespace (nsenter).  Also the sign of MPICH's own
deadlock in MPI_Finalize, which the tests of MPI jobs on several nodes (here and under Slurm)
take for a finished job."""

import contextlib
import ipaddress
import os
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as named_netns
from pyroute2.netlink.exceptions import NetlinkError

UNDERLAY = ipaddress.IPv4Network("10.214.9.0/24")  # the nodes' own network, only on the bridge


class Nodes:
    """Two network namespaces on one bridge, each with an address of UNDERLAY."""

    made = 0  # in this test run: each instance's names are its own

    def __init__(self):
        Nodes.made += 1
        tag = f"{os.getpid() & 0xfff:03x}{Nodes.made & 0xff:02x}"
        self.names = [f"hpccrtest{tag}n{i}" for i in range(2)]
        self.addresses = [str(UNDERLAY[1 + i]) for i in range(2)]
        self.bridge = f"ovb{tag}"
        self.outside = [f"ov{tag}p{i}" for i in range(2)]  # the bridge's end of each node's link
        try:
            self._make()
        except BaseException:
            self.remove()
            raise

    def _make(self):
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            bridge = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=bridge, state="up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
                named_netns.create(name)
                outside = self.outside[i]
                ipr.link("add", ifname=outside, kind="veth",
                         peer={"ifname": "ul0", "net_ns_fd": name})
                end = ipr.link_lookup(ifname=outside)[0]
                ipr.link("set", index=end, master=bridge, state="up")
                with NetNS(name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                    inside = ns.link_lookup(ifname="ul0")[0]
                    ns.addr("add", index=inside, address=address,
                            prefixlen=UNDERLAY.prefixlen)
                    ns.link("set", index=inside, state="up")

    def wrap(self, i: int) -> tuple[str, ...]:
        """The command prefix that runs a command on node i."""
        return ("nsenter", f"--net=/run/netns/{self.names[i]}")

    def remove(self):
        """The nodes unplugged and their names gone; a namespace itself goes with the last
        process in it (the harness kills those after this).  The links go first: a namespace
        without processes is torn down asynchronously once its name goes, and takes its end of
        a veth pair, with the bridge's end, at a moment of its own."""
        with IPRoute() as ipr:
            for link in (*self.outside, self.bridge):
                if ipr.link_lookup(ifname=link):
                    with contextlib.suppress(NetlinkError):  # ENODEV: its namespace took it
                        ipr.link("del", ifname=link)
        for name in self.names:
            if os.path.exists(f"/run/netns/{name}"):
                named_netns.remove(name)


@pytest.fixture
def nodes():
    made = Nodes()
    yield made
    made.remove()


def part_env(job_id: int, slot: int, node_addresses: list[str]) -> dict[str, str]:
    """What hpccr needs in its environment to run or restore the part at `slot` of job
    `job_id`, whose nodes (by slot) are `node_addresses`."""
    return {"HPCCR_JOB_NODES": ",".join(node_addresses), "HPCCR_NODE_SLOT": str(slot),
            "HPCCR_JOB_ID": str(job_id)}


def finalize_deadlock(binary: Path) -> bool:
    """Whether a rank running `binary` shows MPICH 4.0's deadlock in MPI_Finalize over TCP
    (docs/slurm.md): it waits in the PMI barrier (a read on its PMI socket) while one of its
    TCP connections holds unread bytes, a peer's flush request that only this rank's progress
    would acknowledge."""
    for proc in Path("/proc").iterdir():
        try:
            if (not proc.name.isdigit() or os.readlink(proc / "exe") != str(binary)
                    or (proc / "wchan").read_text() != "unix_stream_read_generic"):
                continue
            held = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
            table = (proc / "net" / "tcp").read_text().splitlines()[1:]
        except OSError:  # gone meanwhile
            continue
        for fields in map(str.split, table):
            if f"socket:[{fields[9]}]" in held and int(fields[4].split(":")[1], 16):
                return True
    return False
