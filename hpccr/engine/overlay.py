"""A job network that spans nodes: a VXLAN overlay between the parts of one job.

A job that runs on several nodes has one part per node, each in a network namespace of its own
(netns.JobNetwork), at a node slot 0, 1, ….  The job has a small network of its own (a /24 of
the site's ``overlay_subnet``) and a VXLAN id (of the site's ``overlay_ids``), both from its id;
the part at slot i has the i+1-th address of that network and the host name ``<job>-<i>``, and
every part resolves every other's name (its /etc/hosts).

Each part holds a VXLAN device ``hpccr0`` with its address.  The device is made in the node's
network namespace, where its UDP socket lives on the node's address (the underlay), and moved
into the part's: inside, it carries the job's network; outside, its packets go between nodes.
Without learning, one forwarding entry per other node sends every frame for the job's network
to every peer's node address (head-end replication).  A restore on other nodes (or the same ones
in another order) makes the device again with the new nodes' addresses: only the forwarding
changes, nothing the job sees.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

from hpccr.engine import netlink
from hpccr.errors import HpccrError, ImageCorrupt

DEVICE = "hpccr0"  # in the part's namespace
VXLAN_PORT = 4789
PREFIX_LEN = 24  # the job's network: a /24, so up to 254 node slots
ALL_ZEROS = "00:00:00:00:00:00"  # the forwarding entry for every frame
MAX_VNI = (1 << 24) - 1
# A part killed outright (not by a dump) keeps its VXLAN id on its node until the kernel has
# torn its namespace down, once its closing connections are gone: a part restored on that node
# waits that long for the id.
PREVIOUS_PART_WAIT = 180.0
NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Overlay:
    """One part's view of the job's overlay: its id, the job's network, the part's slot, and
    the host name of every slot (their count is the job's node count)."""

    vni: int
    network: str  # "a.b.c.0/24"
    slot: int
    names: tuple[str, ...]

    def address(self, slot: int | None = None) -> str:
        """The address of the part at `slot` (this part's by default)."""
        return str(ipaddress.IPv4Network(self.network)[1 + (self.slot if slot is None
                                                               else slot)])

    def hosts(self) -> list[tuple[str, str]]:
        """(address, name) of every part, for /etc/hosts."""
        return [(self.address(slot), name) for slot, name in enumerate(self.names)]

    def to_image(self) -> dict:
        return {"vni": self.vni, "network": self.network, "slot": self.slot,
                "names": list(self.names)}

    @classmethod
    def from_image(cls, saved: dict) -> Overlay:
        """The overlay an image records, checked: images are untrusted input."""
        def corrupt(what: str) -> ImageCorrupt:
            return ImageCorrupt(f"image.json: network.overlay: {what} (image corrupted)")

        try:
            network = ipaddress.IPv4Network(saved["network"])
        except ValueError:
            raise corrupt(f"{saved['network']!r} is not an IPv4 network") from None
        if network.prefixlen != PREFIX_LEN:
            raise corrupt(f"{network} is not a /{PREFIX_LEN}")
        names = saved["names"]
        if not 1 <= len(names) <= network.num_addresses - 2:
            raise corrupt(f"{len(names)} node slots in {network}")
        if not all(isinstance(name, str) and NAME.fullmatch(name) for name in names):
            raise corrupt("a slot's host name is not a host name")
        if not 0 <= saved["slot"] < len(names):
            raise corrupt(f"slot {saved['slot']} of {len(names)}")
        if not 0 < saved["vni"] <= MAX_VNI:
            raise corrupt(f"VXLAN id {saved['vni']} out of range")
        return cls(saved["vni"], str(network), saved["slot"], tuple(names))


def choose(subnet: str, ids: tuple[int, int], job_id: int, slot: int, nodes: int,
           name: str) -> Overlay:
    """The overlay of part `slot` of a job of `nodes` nodes with id `job_id`: the job's /24 of
    `subnet` and VXLAN id of the range `ids` both from its id (every part finds the same), host
    names `<name>-<slot>`."""
    networks = list(ipaddress.IPv4Network(subnet).subnets(new_prefix=PREFIX_LEN))
    if not 1 <= nodes <= 254:
        raise HpccrError(f"a job network spans 1 to 254 nodes, not {nodes}")
    if not 0 <= slot < nodes:
        raise HpccrError(f"node slot {slot} is not one of the job's {nodes}")
    first, last = ids
    return Overlay(first + job_id % (last - first + 1), str(networks[job_id % len(networks)]),
                   slot, tuple(f"{name}-{i}" for i in range(nodes)))


def underlay(nodes: list[str], count: int) -> list[str]:
    """The node addresses (the underlay) of the slots of a job of `count` nodes, from the list
    the restore or run was given (addresses, one per slot, in slot order)."""
    if len(nodes) < count:
        raise HpccrError(f"the job has {count} node slots and was given {len(nodes)} nodes "
                         "(HPCCR_JOB_NODES): it cannot run on fewer nodes than it was "
                         "checkpointed on")
    try:
        return [str(ipaddress.IPv4Address(node)) for node in nodes[:count]]
    except ValueError as exc:
        raise HpccrError(f"a job node must be an IPv4 address: {exc}") from None


def attach(overlay: Overlay, job_netns_fd: int, nodes: list[str]) -> None:
    """Make the part's VXLAN device on this node (whose address is nodes[slot]), move it into
    the part's network namespace (`job_netns_fd`); called in the node's namespace.  The device
    is configured inside by `configure_inside`."""
    local = nodes[overlay.slot]
    with netlink.IPRoute() as ipr:
        holders = [a["index"] for a in ipr.get_addr(family=socket.AF_INET, address=local)]
        if not holders:
            raise HpccrError(f"this node has no address {local} (node slot {overlay.slot} of "
                             "the job's nodes)")
        temporary = f"hpccr-v{os.getpid() & 0xffffff:06x}"  # unique on the node for a moment
        deadline, waiting = time.monotonic() + PREVIOUS_PART_WAIT, False
        while True:
            try:
                ipr.link("add", ifname=temporary, kind="vxlan", vxlan_id=overlay.vni,
                         vxlan_local=local, vxlan_link=holders[0], vxlan_port=VXLAN_PORT,
                         vxlan_learning=0)
                break
            except netlink.NetlinkError as exc:
                if exc.code != errno.EEXIST or time.monotonic() > deadline:
                    raise HpccrError(f"cannot make the job's overlay device (VXLAN id "
                                     f"{overlay.vni}) on this node: {os.strerror(exc.code)}"
                                     ) from None
                if not waiting:
                    print(f"hpccr: waiting for the job's VXLAN id {overlay.vni} on this node "
                          "(a part of the job killed here is still being torn down)",
                          file=sys.stderr, flush=True)
                    waiting = True
            time.sleep(0.1)  # a killed part's namespace, torn down once its sockets are
        try:
            index = ipr.link_lookup(ifname=temporary)[0]
            ipr.link("set", index=index, net_ns_fd=job_netns_fd, ifname=DEVICE)
        except BaseException:
            ipr.link("del", ifname=temporary)
            raise


def configure_inside(overlay: Overlay) -> None:
    """In the part's network namespace: the device up with the part's address in the job's
    network and a hardware address made of it, the same after a restore (the other parts'
    neighbour caches stay right).  It sends nothing before `forward`."""
    with netlink.IPRoute() as ipr:
        index = ipr.link_lookup(ifname=DEVICE)[0]
        ipr.link("set", index=index, address=hardware_address(overlay.address()))
        ipr.addr("add", index=index, address=overlay.address(), prefixlen=PREFIX_LEN)
        ipr.link("set", index=index, state="up")


def forward(overlay: Overlay, nodes: list[str]) -> None:
    """In the part's network namespace: one forwarding entry per other node.  A restore adds
    them once the part's connections are back: until then whatever its kernel would answer
    a peer (a reset, for a connection not yet there) goes nowhere."""
    with netlink.IPRoute() as ipr:
        index = ipr.link_lookup(ifname=DEVICE)[0]
        for slot, node in enumerate(nodes):
            if slot != overlay.slot:
                ipr.fdb("append", ifindex=index, lladdr=ALL_ZEROS, dst=node)


def hardware_address(address: str) -> str:
    """A locally administered unicast MAC address holding the IPv4 `address`."""
    return ":".join(f"{byte:02x}" for byte in (0x02, 0x68, *ipaddress.IPv4Address(address).packed))


def of_namespace(hostname: str) -> Overlay | None:
    """The overlay of the part whose network namespace the calling thread is in and whose host
    name is `hostname`, read back from the kernel (its device, address and forwarding
    entries); None if it has no overlay device."""
    with netlink.IPRoute() as ipr:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return None
        index = found[0]
        device = ipr.get_links(index)[0]
        vni = device.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA").get_attr(
            "IFLA_VXLAN_ID")
        interfaces = [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                      for a in ipr.get_addr(family=socket.AF_INET, index=index)]
        peers = [entry for entry in ipr.fdb("dump", ifindex=index)
                 if entry.get_attr("NDA_LLADDR") == ALL_ZEROS and entry.get_attr("NDA_DST")]
    if len(interfaces) != 1 or interfaces[0].network.prefixlen != PREFIX_LEN:
        raise HpccrError(f"the job's overlay device {DEVICE} has {len(interfaces)} addresses, "
                         f"not one of a /{PREFIX_LEN}: it was changed inside the job")
    network = interfaces[0].network
    slot = int(interfaces[0].ip) - int(network[1])
    base, _, number = hostname.rpartition("-")
    if number != str(slot):
        raise HpccrError(f"the job's host name {hostname} is not that of its node slot {slot}: "
                         "it was changed inside the job")
    return Overlay(vni, str(network), slot, tuple(f"{base}-{i}" for i in range(len(peers) + 1)))
