"""A job's own network: a network namespace with loopback and one IPv4 address of the job's
own, and a UTS namespace with a host name of its own that resolves to that address inside the
job (a private /etc/hosts in the job's mount namespace).  The image records both, and a restore
makes them again, on any node: MPI libraries write addresses and host names down at start.

The job reaches the outside through a veth pair: ``eth0`` in the job, with the job's address
(/32) and a default route through GATEWAY, a link-local address that the node's end of every
job's pair holds; on the node, a route to the job's address through the node's end (named
``hpccr-j<address in hex>``), and a NAT table ``hpccr_nat_<address in hex>`` masquerading what
the job sends elsewhere.  The node forwards IPv4 (net.ipv4.ip_forward is turned on).  A process
on the node reaches the job at its address.

Nothing outlives the job: the kernel removes the veth pair (and its routes) with the job's
namespace, whoever waits for the job removes both at its end, ``clear_leftovers`` removes the
links of a namespace that outlives its processes (closing connections keep it) when nobody
waited for them (hpccr killed; before each new job network, and in the Slurm epilog), and
``lift_stale`` removes the NAT tables whose link is gone (before each new job network).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from hpccr import native
from hpccr.engine import netlink, nftables, overlay, procfs
from hpccr.errors import HpccrError, ImageCorrupt

CLONE_NEWNET, CLONE_NEWUTS = 0x40000000, 0x04000000
NSTYPES = {"net": CLONE_NEWNET, "uts": CLONE_NEWUTS}
MS_BIND = 0x1000
GATEWAY = "169.254.1.1"
JOB_LINK = "eth0"
LINK_PREFIX = "hpccr-j"
TABLE_PREFIX = "hpccr_nat_"
POSTROUTING, PRIORITY_SRCNAT = 4, 100  # NF_INET_POST_ROUTING, NF_IP_PRI_NAT_SRC
RT_SCOPE_LINK = 253
IFNAMSIZ = 16
SADDR_OFFSET = 12  # in the IPv4 header
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
ETC_HOSTS = "/etc/hosts"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


@dataclass(frozen=True)
class Spec:
    """What the job sees of its network: its address and its host name; for one part of a job
    on several nodes, the job's overlay too (its address and host name are its slot's)."""

    address: str
    hostname: str
    overlay: overlay.Overlay | None = None

    def to_image(self) -> dict:
        saved = {"address": self.address, "hostname": self.hostname}
        if self.overlay is not None:
            saved["overlay"] = self.overlay.to_image()
        return saved

    def hosts(self) -> list[tuple[str, str]]:
        """(address, name) of every host the job knows by name: itself, and its other parts."""
        return self.overlay.hosts() if self.overlay else [(self.address, self.hostname)]

    @classmethod
    def from_image(cls, saved: dict) -> Spec:
        """The spec an image records, checked: images are untrusted input."""
        try:
            address = ipaddress.IPv4Address(saved["address"])
        except ValueError:
            raise ImageCorrupt(f"image.json: network.address: {saved['address']!r} is not an "
                               "IPv4 address (image corrupted)") from None
        if address.is_loopback or address.is_link_local or address.is_multicast or \
                address.is_unspecified:
            raise ImageCorrupt(f"image.json: network.address: {address} cannot be a job's "
                               "address (image corrupted)")
        if not HOSTNAME.fullmatch(saved["hostname"]):
            raise ImageCorrupt(f"image.json: network.hostname: {saved['hostname']!r} is not a "
                               "host name (image corrupted)")
        part_of = None
        if saved.get("overlay") is not None:
            part_of = overlay.Overlay.from_image(saved["overlay"])
            if (part_of.address(), part_of.names[part_of.slot]) != (str(address),
                                                                     saved["hostname"]):
                raise ImageCorrupt("image.json: network: the address and host name are not "
                                   "those of the job's node slot (image corrupted)")
        return cls(str(address), saved["hostname"], part_of)


def link_name(address: str) -> str:
    return LINK_PREFIX + ipaddress.IPv4Address(address).packed.hex()


def choose(subnet: str, hint: int | None = None, hostname: str | None = None) -> Spec:
    """A spec for a new job: the first address of `subnet` from `hint` on (a Slurm job id, so
    that jobs on other nodes seldom have the same one; else at random) that no job on this node
    has; the host name `hostname`, or hpccr-<address in hex>."""
    net = ipaddress.IPv4Network(subnet)
    count = net.num_addresses - 2
    start = (hint if hint is not None else secrets.randbelow(count)) % count
    with netlink.IPRoute() as ipr:
        for i in range(count):
            address = str(net[1 + (start + i) % count])
            if not ipr.link_lookup(ifname=link_name(address)):
                name = hostname or "hpccr-" + link_name(address).removeprefix(LINK_PREFIX)
                return Spec(address, name)
    raise HpccrError(f"no free address left in the job network {subnet}")


def _ns_path(pid: int, kind: str) -> str:
    """/proc path of a namespace of process `pid`, through a thread that runs (its main thread
    may have exited: pthread_exit in main)."""
    if procfs.leader_exited(pid):
        return procfs.path(pid, "task", str(procfs.running_thread(pid)), "ns", kind)
    return procfs.path(pid, "ns", kind)


def shares_ours(pid: int) -> bool:
    """Is process `pid` in our network namespace?"""
    return os.stat(_ns_path(pid, "net")).st_ino == os.stat("/proc/thread-self/ns/net").st_ino


def of_process(pid: int) -> Spec | None:
    """The spec of the job network process `pid` is in; None if it shares our network or its
    namespace is not a job network (no single address besides loopback's)."""
    if shares_ours(pid):
        return None
    with _entered(_ns_path(pid, "uts"), "uts"):
        hostname = socket.gethostname()
    with entered_of(pid):
        with netlink.IPRoute() as ipr:
            addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                         if not ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")).is_loopback}
        part_of = overlay.of_namespace(hostname)
    if len(addresses) != 1:
        return None
    address = addresses.pop()
    if part_of is not None and part_of.address() != address:
        return None
    return Spec(address, hostname, part_of)


def entered_of(pid: int) -> contextlib.AbstractContextManager:
    """The calling thread in the network namespace of process `pid` for the block."""
    return _entered(_ns_path(pid, "net"), "net")


@contextlib.contextmanager
def _entered(path: str, kind: str) -> Iterator[None]:
    """The calling thread in the namespace of `kind` ("net", "uts") at `path` for the block."""
    nstype = NSTYPES[kind]
    own = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        native.syscall("setns", target, nstype)
        try:
            yield
        finally:
            native.syscall("setns", own, nstype)
    finally:
        os.close(target)
        os.close(own)


class JobNetwork:
    """The network namespace made for one job (held by a descriptor), linked to the node."""

    def __init__(self, spec: Spec, isolated_if_taken: bool = False, down: bool = False,
                 nodes: list[str] | None = None):
        """The job's network, linked to the node.  Where its address is taken on this node (a
        second copy of a job restored beside the first), it fails, or with `isolated_if_taken`
        the job has its address and host name but no link: it reaches nothing outside.

        With `down`, the node's end of the link stays down, the node without a route to the
        job and the overlay without forwarding, until `up()`: a restore brings the job's
        connections back first, so that no packet a peer sends meanwhile (a retransmission)
        meets the job's address without its socket and is answered with a reset.  The job's
        own routes are there from the start (a connected socket is restored with a route to
        its peer).

        A part of a job on several nodes joins the job's overlay through `nodes`, the address
        of every slot's node (this one's included), in slot order."""
        self.spec = spec
        self.link = link_name(spec.address)
        self.table = TABLE_PREFIX + self.link.removeprefix(LINK_PREFIX)
        self.linked = False
        self.nodes: list[str] = []  # a part's: the job's nodes, once it has joined the overlay
        self.fd = None
        clear_leftovers(self.link)  # a previous run's, here, whose hpccr was killed
        lift_stale()
        self.node_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            native.syscall("unshare", CLONE_NEWNET)
            self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            native.syscall("setns", self.node_fd, CLONE_NEWNET)
        try:
            try:
                self._link()
                self.linked = True
            except netlink.NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                if not isolated_if_taken:
                    raise HpccrError(f"the job's address {spec.address} is taken on this node "
                                     f"(link {self.link} exists)") from None
                print(f"hpccr: warning: the job's address {spec.address} is taken on this node "
                      "(another copy of the job?): this one runs without a link to the node",
                      file=sys.stderr, flush=True)
            self._configure_inside()
            if spec.overlay is not None:
                self._join_overlay(overlay.underlay(nodes or [], len(spec.overlay.names)))
            if self.linked:
                self._masquerade()
            if not down:
                self.up()
        except netlink.NetlinkError as exc:
            self.remove()
            raise HpccrError(f"cannot make the job's network: {os.strerror(exc.code)}") from None
        except OSError as exc:
            self.remove()
            raise HpccrError(f"cannot make the job's network: {exc.strerror or exc}") from None
        except BaseException:
            self.remove()
            raise

    def entered(self) -> contextlib.AbstractContextManager:
        """The calling thread in the job's network for the block."""
        return _entered(f"/proc/self/fd/{self.fd}", "net")

    def fork_inside(self, fork) -> int:
        """`fork()` with the child in the job's network (it stays there; the parent not)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        pid = -1
        try:
            native.syscall("setns", self.fd, CLONE_NEWNET)
            pid = fork()
        finally:
            if pid != 0:  # the parent (or no child): back to its own network
                native.syscall("setns", own, CLONE_NEWNET)
                os.close(own)
        return pid

    def _link(self) -> None:
        """The veth pair, the node's end with the gateway address and a route to the job."""
        with netlink.IPRoute() as ipr:
            ipr.link("add", ifname=self.link, kind="veth",
                     peer={"ifname": JOB_LINK, "net_ns_fd": self.fd})
            node_end = ipr.link_lookup(ifname=self.link)[0]
            ipr.addr("add", index=node_end, address=GATEWAY, prefixlen=32)
        with open(IP_FORWARD) as forward:
            forwarding = forward.read().strip() == "1"
        if not forwarding:
            with open(IP_FORWARD, "w") as forward:
                forward.write("1")

    def _configure_inside(self) -> None:
        """Loopback up; the job's address on eth0 with the default route through the node, or
        (not linked) on loopback."""
        with self.entered(), netlink.IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            if not self.linked:
                ipr.addr("add", index=lo, address=self.spec.address, prefixlen=32)
                return
            job_end = ipr.link_lookup(ifname=JOB_LINK)[0]
            ipr.addr("add", index=job_end, address=self.spec.address, prefixlen=32)
            ipr.link("set", index=job_end, state="up")
            ipr.route("add", dst=f"{GATEWAY}/32", oif=job_end, scope=RT_SCOPE_LINK)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=job_end)

    def _join_overlay(self, nodes: list[str]) -> None:
        overlay.attach(self.spec.overlay, self.fd, nodes)
        with self.entered():
            overlay.configure_inside(self.spec.overlay)
        self.nodes = nodes

    def up(self) -> None:
        """The node's end of the link up, with the node's route to the job, and a part's
        forwarding to the other nodes.  Called in the job's network as well as in the node's."""
        if self.nodes:
            with self.entered():
                overlay.forward(self.spec.overlay, self.nodes)
        if not self.linked:
            return
        try:
            with _entered(f"/proc/self/fd/{self.node_fd}", "net"), netlink.IPRoute() as ipr:
                node_end = ipr.link_lookup(ifname=self.link)[0]
                ipr.link("set", index=node_end, state="up")
                ipr.route("add", dst=f"{self.spec.address}/32", oif=node_end,
                          scope=RT_SCOPE_LINK)
        except netlink.NetlinkError as exc:
            raise HpccrError(f"cannot link the job's network to the node: "
                             f"{os.strerror(exc.code)}") from None

    def _masquerade(self) -> None:
        with nftables.netfilter("cannot make the job network's NAT") as nft:
            nftables.transaction(nft, [
                nftables.message(netlink.nft_table_msg, netlink.NFT_MSG_NEWTABLE,
                                 {"name": self.table}, nftables.CREATE),
                nftables.chain_message(self.table, "postrouting", POSTROUTING, PRIORITY_SRCNAT,
                                       kind="nat"),
                nftables.message(netlink.nft_rule_msg, netlink.NFT_MSG_NEWRULE, {
                    "table": self.table, "chain": "postrouting",
                    "expressions": self._masquerade_rule()}, nftables.APPEND),
            ])

    def _masquerade_rule(self) -> list:
        """What the job sends out of the node, but not to the job: from the node's address."""
        return [
            *nftables.load_and_compare("meta", {"key": netlink.Meta.NFT_META_NFPROTO},
                                       bytes([netlink.NFPROTO_IPV4])),
            *nftables.payload_equals(1, SADDR_OFFSET,
                                     ipaddress.IPv4Address(self.spec.address).packed),
            *nftables.load_and_compare("meta", {"key": netlink.Meta.NFT_META_OIFNAME},
                                       self.link.encode().ljust(IFNAMSIZ, b"\0"),
                                       op=netlink.Cmp.NFT_CMP_NEQ),
            *netlink.masq(),
        ]

    def release(self) -> None:
        """Let go of the namespace (the job holds it now); the link and NAT stay for the job,
        and are removed by lift_stale once it is gone."""
        for fd in (self.fd, self.node_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.node_fd = None

    def remove(self) -> None:
        """The job has ended (or never ran): remove its link, overlay device, NAT and
        namespace.  The namespace may outlive this for a while (closing connections): without
        its links it holds no VXLAN id and no packet reaches it."""
        if self.fd is not None:
            with self.entered():
                disconnect()
        self.release()
        if not self.linked:
            return  # the link and NAT of that address, if any, are another job's
        with netlink.IPRoute() as ipr, contextlib.suppress(netlink.NetlinkError):
            ipr.link("del", ifname=self.link)
        with nftables.netfilter(f"cannot remove the job network's NAT {self.table}") as nft:
            nftables.delete_table(nft, self.table)


def disconnect() -> None:
    """In a job's network namespace, before its job is killed: remove its links to the outside
    (eth0 and the overlay's device).  Once the job is gone its namespace is torn down, its
    network locks first: a peer's packet arriving then would be answered with a reset."""
    with netlink.IPRoute() as ipr:
        for name in (JOB_LINK, overlay.DEVICE):
            with contextlib.suppress(netlink.NetlinkError):
                ipr.link("del", ifname=name)


def clear_leftovers(link: str | None = None) -> list[str]:
    """Remove what is left of job networks whose processes are gone but whose namespace lives
    on (a part or job whose hpccr was killed: nothing removed its links, and closing
    connections whose peers are gone keep the namespace for minutes): the node's end of its
    link, and inside, its overlay device.  That device keeps the job's VXLAN id on the node (a
    restore of the job there could not make its own), and the job's other parts, restored
    elsewhere, would reach those closing connections through it and be reset by them.  Only
    `link` if given; returns the links removed.  A namespace is in use while a thread is in it
    or a process holds a descriptor of it (hpccr does, while it makes one)."""
    with netlink.IPRoute() as ipr:
        candidates = {}  # the namespace's id here -> the node's end of its link
        if link is None:
            links = ipr.get_links()
        else:
            links = [found for index in ipr.link_lookup(ifname=link)
                     for found in ipr.get_links(index)]
        for found in links:
            name, nsid = found.get_attr("IFLA_IFNAME"), found.get_attr("IFLA_LINK_NETNSID")
            if name.startswith(LINK_PREFIX) and nsid is not None:
                candidates[nsid] = found
        if candidates:
            for nsid in _namespaces_in_use(ipr):
                candidates.pop(nsid, None)
        for nsid, node_end in candidates.items():
            with contextlib.suppress(netlink.NetlinkError):  # none: not a part, or removed already
                for device in ipr.link("get", ifname=overlay.DEVICE, IFLA_IF_NETNSID=nsid):
                    ipr.link("del", index=device["index"], IFLA_IF_NETNSID=nsid)
            with contextlib.suppress(netlink.NetlinkError):  # gone with its namespace meanwhile
                ipr.link("del", index=node_end["index"])
    return [node_end.get_attr("IFLA_IFNAME") for node_end in candidates.values()]


def _namespaces_in_use(ipr: netlink.IPRoute) -> set[int]:
    """The ids, as this network namespace knows them, of the network namespaces that a thread
    is in or a process holds a descriptor of."""
    paths: dict[int, str] = {}  # inode -> a path that opens it
    for pid in procfs.pids():
        try:
            tids, fds = procfs.tids(pid), procfs.fds(pid)
        except OSError:
            continue  # ended meanwhile, or a zombie: in no namespace
        # Each thread and descriptor on its own: one that ends meanwhile (an hpccr making a
        # job's network opens and closes many) must not hide the others, the namespace's own.
        for tid in tids:
            path = procfs.path(pid, "task", str(tid), "ns", "net")
            with contextlib.suppress(OSError):
                paths.setdefault(os.stat(path).st_ino, path)
        for fd in fds:
            path = procfs.path(pid, "fd", str(fd))
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                if target.startswith("net:["):
                    paths.setdefault(int(target[5:-1]), path)
    used = set()
    for path in paths.values():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            used.add(ipr.get_netnsid(fd=fd)["nsid"])
        finally:
            os.close(fd)
    return used


def lift_stale() -> list[str]:
    """Remove the NAT tables of job networks whose link is gone; returns their names."""
    removed = []
    with nftables.netfilter("cannot remove stale job networks") as nft, netlink.IPRoute() as ipr:
        for table in nftables.table_names(nft, TABLE_PREFIX):
            if not ipr.link_lookup(ifname=LINK_PREFIX + table.removeprefix(TABLE_PREFIX)):
                nftables.delete_table(nft, table)
                removed.append(table)
    return removed


def enter(spec: Spec) -> None:
    """In the job's first process, in its new mount namespace: a UTS namespace with the job's
    host name, and an /etc/hosts that has it, at the job's address."""
    native.syscall("unshare", CLONE_NEWUTS)
    socket.sethostname(spec.hostname)
    try:
        with open(ETC_HOSTS) as f:
            hosts = f.read()
    except FileNotFoundError:
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    if hosts and not hosts.endswith("\n"):
        hosts += "\n"
    fd, path = tempfile.mkstemp(prefix="hpccr-hosts-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(hosts + "".join(f"{address}\t{name}\n" for address, name in spec.hosts()))
        os.chmod(path, 0o644)
        native.mount(path, ETC_HOSTS, "", MS_BIND)
    finally:
        os.unlink(path)  # the mount holds the file
