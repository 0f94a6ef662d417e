"""Network locks: while hpccr checkpoints TCP connections, netfilter drops every packet of them,
both ways, so that no peer learns that a connection died (the kernel sends no RST, FIN or data,
and answers none of the peer's packets) between the freeze and the restore.

A lock is one nftables table of family inet, ``hpccr_lock_<id>``, made in one netlink
transaction (all of it or nothing): base chains on the input and output hooks at the raw
priority, before conntrack, each with one rule per connection dropping its exact 4-tuple.  It
acts in the network namespace of the calling process.

A lock outlives the process that made it once it is bound to a checkpoint image: it then lasts
until a restore of that image lifts it.  A registry, one JSON record per lock in
``/run/hpccr/netlocks`` (``$HPCCR_NETLOCK_DIR``), says who owns each lock, so that
``lift_stale`` can lift the locks nobody will lift.  The record is written before the table:
a table without a record is always stale.  Every registry operation holds an flock on the
registry, so ``lift_stale`` never sees a lock half made.  A table names its registry (in its
comment): where several registries share a network namespace (tests run beside hpccr), each
judges only its own tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from hpccr import native
from hpccr.engine import netlink, procfs
from hpccr.engine.nftables import (
    APPEND,
    CREATE,
    NF_DROP,
    chain_message,
    delete_table,
    load_and_compare,
    message,
    netfilter,
    payload_equals,
    table_names,
    transaction,
)
from hpccr.errors import DumpFailed

REGISTRY_DIR = "/run/hpccr/netlocks"
TABLE_PREFIX = "hpccr_lock_"
ID_PATTERN = re.compile(r"[0-9a-f]{8}")
PRIORITY_RAW = -300  # before conntrack (-200): a dropped packet leaves no trace there either
HOOKS = {"input": 1, "output": 3}  # NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT
NETWORK_HEADER, TRANSPORT_HEADER = 1, 2  # NFT_PAYLOAD_NETWORK_HEADER, ..._TRANSPORT_HEADER
# By address length: the netfilter protocol, and the offsets of saddr and daddr in its header.
NFPROTO = {4: netlink.NFPROTO_IPV4, 16: netlink.NFPROTO_IPV6}
ADDRESS_OFFSETS = {4: (12, 16), 16: (8, 24)}
SPORT_OFFSET, DPORT_OFFSET = 0, 2
ENDED = ("Z", "X")  # a zombie owner is gone too: it will never lift its lock


@dataclass(frozen=True)
class Connection:
    """One TCP connection as its local socket sees it."""

    family: int  # socket.AF_INET or socket.AF_INET6
    local: str  # address text: "127.0.0.1", "::1", "::ffff:10.0.0.1"
    local_port: int
    remote: str
    remote_port: int


def lock(connections: list[Connection]) -> str:
    """Drop every packet of `connections` until unlocked; returns the lock's id.  A watchdog
    lifts it should this process die first (see _watch)."""
    rules = [rule for connection in connections for rule in _drop_rules(connection)]
    watchdog = _watch()
    with _registry() as registry:
        lock_id = _new_id(registry)
        table = TABLE_PREFIX + lock_id
        _write_record(registry, lock_id, {
            "owner_pid": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "netns": _netns(),
            "image": None,
            "created": time.time(),
            "connections": [asdict(connection) for connection in connections],
        })
        try:
            with netfilter("cannot lock the TCP connections", DumpFailed) as nft:
                transaction(nft, [
                    message(netlink.nft_table_msg, netlink.NFT_MSG_NEWTABLE,
                            {"name": table, "userdata": registry}, CREATE),
                    *(chain_message(table, chain, hook, PRIORITY_RAW)
                      for chain, hook in HOOKS.items()),
                    *(message(netlink.nft_rule_msg, netlink.NFT_MSG_NEWRULE,
                              {"table": table, "chain": chain, "expressions": expressions},
                              APPEND)
                      for chain, expressions in rules),
                ])
        except BaseException:
            os.unlink(_record_path(registry, lock_id))
            _end_watchdog(watchdog)
            raise
    _watchdogs[lock_id] = watchdog
    return lock_id


# A watchdog per unbound lock: a process of its own session (a kill of hpccr's process group
# spares it) that waits for this process to end (a pidfd becomes readable once it is a zombie,
# when lift_stale sees it ended), then lifts whatever locks are stale: an unbound one of a dead
# owner, not one bound to an image.  Lifting or binding the lock ends its watchdog.
_watchdogs: dict[str, subprocess.Popen] = {}
_WATCHDOG = """
import os, select, sys
owner = int(sys.argv[1])
try:
    pidfd = os.pidfd_open(owner)
    if os.getppid() == owner:  # else the owner ended before the pidfd was opened
        select.select([pidfd], [], [])
except ProcessLookupError:
    pass  # the owner is gone already
from hpccr.engine import netlock
netlock.lift_stale()
"""


def _watch() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _end_watchdog(watchdog: subprocess.Popen) -> None:
    watchdog.kill()
    watchdog.wait()


def _release_watchdog(lock_id: str) -> None:
    watchdog = _watchdogs.pop(lock_id, None)
    if watchdog is not None:
        _end_watchdog(watchdog)


def unlock(lock_id: str) -> None:
    """Lift a lock: its table, then its record.  An unknown or lifted id is no error."""
    if not ID_PATTERN.fullmatch(lock_id):
        return
    with _registry() as registry, netfilter(f"cannot lift network lock {lock_id}") as nft:
        _lift(nft, registry, lock_id)
    _release_watchdog(lock_id)


def bind_to_image(lock_id: str, image_dir: str) -> None:
    """Hand the lock over to a checkpoint image: it outlives this process and is lifted by a
    restore of that image, or as stale once the image directory is gone.  The directory must
    exist already (bind after the image is in place), else the lock would be stale at once."""
    image = os.path.realpath(image_dir)
    if not os.path.isdir(image):
        raise DumpFailed(f"network lock {lock_id}: image directory {image_dir} does not exist")
    with _registry() as registry:
        record = _read_record(registry, lock_id)
        if record is None:
            raise DumpFailed(f"network lock {lock_id} is gone: its connections are not locked")
        record["image"] = image
        _write_record(registry, lock_id, record)
    _release_watchdog(lock_id)


def forget(lock_id: str) -> None:
    """Drop the record of a lock whose table goes with its network namespace (a killed job's
    own network): nobody has to lift it."""
    if not ID_PATTERN.fullmatch(lock_id):
        return
    with _registry() as registry, contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(registry, lock_id))


def lift_stale() -> list[str]:
    """Lift every lock of this network namespace that nobody will lift; returns their ids.

    Stale: an unbound lock whose owner (pid and start time) has ended; a bound lock whose image
    directory is gone; a table without a record; a record without a table (its leftover only).
    Records of other network namespaces are left alone (their tables cannot be seen from
    here), and so are the tables of other registries.
    """
    lifted = []
    with _registry() as registry, netfilter("cannot lift stale network locks") as nft:
        tables = _tables(nft)
        own_tables = {lock_id for lock_id, owner in tables.items() if owner == registry}
        records = {lock_id: _read_record(registry, lock_id) for lock_id in _record_ids(registry)}
        netns = _netns()
        for lock_id, record in records.items():
            if record is not None and record["netns"] != netns:
                continue
            if record is None or lock_id not in tables or _stale(record):
                _lift(nft, registry, lock_id)
                lifted.append(lock_id)
        for lock_id in own_tables - records.keys():
            _lift(nft, registry, lock_id)
            lifted.append(lock_id)
    return sorted(lifted)


def held() -> list[str]:
    """Ids of the locks present in this network namespace (their tables)."""
    with netfilter("cannot list network locks") as nft:
        return sorted(_tables(nft))


def _stale(record: dict) -> bool:
    if record["image"] is not None:
        return not os.path.isdir(record["image"])
    return not _alive(record["owner_pid"], record["owner_start"])


def _alive(pid: int, start_time: int) -> bool:
    """Is `pid` still the process that started at `start_time` (not a reused pid)?"""
    try:
        fields = procfs.stat(pid)
    except OSError:
        return False
    return fields[3] not in ENDED and int(fields[22]) == start_time


def _start_time(pid: int) -> int:
    return int(procfs.stat(pid)[22])


def _netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


# --- the registry


@contextlib.contextmanager
def _registry() -> Iterator[str]:
    """The registry directory (its real path), held under an exclusive flock for the block, with
    root's file rights (the registry is root's; a dump for a user has that user's)."""
    registry = os.path.realpath(os.environ.get("HPCCR_NETLOCK_DIR") or REGISTRY_DIR)
    with _root_file_rights():
        os.makedirs(registry, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(registry, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield registry
        finally:
            os.close(fd)


@contextlib.contextmanager
def _root_file_rights() -> Iterator[None]:
    fsuid = native.syscall("setfsuid", 0)
    fsgid = native.syscall("setfsgid", 0)
    try:
        yield
    finally:
        native.syscall("setfsgid", fsgid)
        native.syscall("setfsuid", fsuid)


def _new_id(registry: str) -> str:
    while True:
        lock_id = secrets.token_hex(4)
        if not os.path.exists(_record_path(registry, lock_id)):
            return lock_id


def _record_path(registry: str, lock_id: str) -> str:
    return os.path.join(registry, f"{lock_id}.json")


def _record_ids(registry: str) -> list[str]:
    return [name.removesuffix(".json") for name in os.listdir(registry)
            if name.endswith(".json") and ID_PATTERN.fullmatch(name.removesuffix(".json"))]


def _read_record(registry: str, lock_id: str) -> dict | None:
    """The record of `lock_id`; None when there is none or it cannot be read."""
    try:
        with open(_record_path(registry, lock_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_record(registry: str, lock_id: str, record: dict) -> None:
    """Write atomically: a reader sees the old record or the new one, never a part."""
    fd, temp = tempfile.mkstemp(dir=registry, prefix=f".{lock_id}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, _record_path(registry, lock_id))
    except BaseException:
        os.unlink(temp)
        raise


def _tables(nft: netlink.NFTables) -> dict[str, str | None]:
    """The lock tables in this network namespace: id -> the registry the table names."""
    return {name.removeprefix(TABLE_PREFIX): registry
            for name, registry in table_names(nft, TABLE_PREFIX).items()}


def _lift(nft: netlink.NFTables, registry: str, lock_id: str) -> None:
    delete_table(nft, TABLE_PREFIX + lock_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(registry, lock_id))


# --- the lock's rules


def _drop_rules(connection: Connection) -> list[tuple[str, list]]:
    """(chain, expressions) of the two rules dropping `connection`: what it sends, what it
    receives."""
    local, remote = _wire_address(connection.local), _wire_address(connection.remote)
    if len(local) != len(remote):
        raise ValueError(f"{connection}: one IPv4 and one IPv6 address")
    if len(local) == 16 and connection.family != socket.AF_INET6:
        raise ValueError(f"{connection}: IPv6 addresses on a socket of family {connection.family}")
    return [
        ("output", _tcp_match(local, connection.local_port, remote, connection.remote_port)),
        ("input", _tcp_match(remote, connection.remote_port, local, connection.local_port)),
    ]


def _wire_address(text: str) -> bytes:
    """The address as it travels: an IPv4-mapped IPv6 address goes as IPv4."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.packed


def _tcp_match(source: bytes, sport: int, destination: bytes, dport: int) -> list:
    """Expressions dropping the TCP packets from source:sport to destination:dport."""
    saddr_offset, daddr_offset = ADDRESS_OFFSETS[len(source)]
    return [
        *load_and_compare("meta", {"key": netlink.Meta.NFT_META_NFPROTO},
                          bytes([NFPROTO[len(source)]])),
        *load_and_compare("meta", {"key": netlink.Meta.NFT_META_L4PROTO},
                          bytes([socket.IPPROTO_TCP])),
        *payload_equals(NETWORK_HEADER, saddr_offset, source),
        *payload_equals(NETWORK_HEADER, daddr_offset, destination),
        *payload_equals(TRANSPORT_HEADER, SPORT_OFFSET, sport.to_bytes(2, "big")),
        *payload_equals(TRANSPORT_HEADER, DPORT_OFFSET, dport.to_bytes(2, "big")),
        *netlink.verdict(NF_DROP),
    ]
