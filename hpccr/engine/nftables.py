"""nftables through netlink (pyroute2): transactions of raw nf_tables messages, for the tables
hpccr makes (network locks, the NAT of a job's own network).

Each acts in the network namespace of the calling thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator

from hpccr.engine import netlink
from hpccr.errors import HpccrError

NF_DROP, NF_ACCEPT = 0, 1
BATCH_BEGIN, BATCH_END = 0x10, 0x11  # NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END
# A new table or chain: fail if one of that name exists; a rule, after the chain's others.
CREATE = netlink.NLM_F_CREATE | netlink.NLM_F_EXCL
APPEND = netlink.NLM_F_CREATE | netlink.NLM_F_APPEND
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
DEFAULT_BUFFER = 1 << 20  # pyroute2's
# Socket buffer room per message of a transaction: a rule takes under 700 bytes, the answer
# to it under 4 KiB in the kernel's accounting (an error answer quotes the message).
SEND_ROOM, ANSWER_ROOM = 1024, 4096
MISSING = (errno.EINVAL, errno.EOPNOTSUPP)  # nfnetlink's answers when nf_tables is absent


@contextlib.contextmanager
def netfilter(what: str, error: type[HpccrError] = HpccrError) -> Iterator[netlink.NFTables]:
    """An nftables netlink socket that netfilter answers; a failure in the block becomes
    `error`, one line saying `what`.

    A batch that netfilter refuses whole (no nf_tables, no CAP_NET_ADMIN) is answered only to
    its begin message, which pyroute2 does not wait for: it would wait forever for the others.
    A dump is answered with the error, so one is made first.
    """
    try:
        nft = netlink.NFTables(nfgen_family=netlink.NFPROTO_INET)
    except OSError as exc:
        raise error(f"{what}: no netfilter netlink socket: {exc.strerror}") from exc
    try:
        nft.get_tables()
        yield nft
    except netlink.NetlinkError as exc:
        hint = " (is nf_tables available?)" if exc.code in MISSING else ""
        raise error(f"{what}: nftables: {os.strerror(exc.code)}{hint}") from exc
    except OSError as exc:
        raise error(f"{what}: {exc.strerror}") from exc
    finally:
        nft.close()


def table_names(nft: netlink.NFTables, prefix: str) -> dict[str, str | None]:
    """The tables whose name starts with `prefix`: name -> the table's userdata."""
    return {table.get_attr("NFTA_TABLE_NAME"): table.get_attr("NFTA_TABLE_USERDATA")
            for table in nft.get_tables()
            if table.get_attr("NFTA_TABLE_NAME").startswith(prefix)}


def transaction(nft: netlink.NFTables, messages: list) -> None:
    """Send `messages` as one nftables transaction: the kernel applies all of them or none.

    The kernel takes the batch as one datagram and queues the answer to every message before
    pyroute2 reads any: both socket buffers must hold them all, or the send fails (EMSGSIZE) or
    answers are lost and pyroute2 waits for them forever.
    """
    nft.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, DEFAULT_BUFFER + len(messages) * SEND_ROOM)
    nft.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, DEFAULT_BUFFER + len(messages) * ANSWER_ROOM)
    nft.nlm_request_batch([_batch_marker(BATCH_BEGIN), *messages, _batch_marker(BATCH_END)])


def delete_table(nft: netlink.NFTables, name: str) -> None:
    """Delete a table with everything in it; one that is gone already is no error."""
    try:
        transaction(nft, [message(netlink.nft_table_msg, netlink.NFT_MSG_DELTABLE, {"name": name})])
    except netlink.NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise


def _batch_marker(kind: int) -> netlink.nfgen_msg:
    marker = netlink.nfgen_msg()
    marker["res_id"] = netlink.NFNL_SUBSYS_NFTABLES
    marker["header"]["type"] = kind
    marker["header"]["flags"] = netlink.NLM_F_REQUEST
    return marker


def message(msg_class: type, kind: int, attrs: dict, flags: int = 0):
    """One request of a transaction, acknowledged so that its error (if any) is read."""
    msg = msg_class()
    msg["nfgen_family"] = netlink.NFPROTO_INET
    msg["attrs"] = [(msg_class.name2nla(key), value) for key, value in attrs.items()]
    msg["header"]["type"] = (netlink.NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = netlink.NLM_F_REQUEST | netlink.NLM_F_ACK | flags
    return msg


def chain_message(table: str, chain: str, hook: int, priority: int, kind: str = "filter"):
    """A base chain of `table` on netfilter hook `hook`, accepting what no rule drops."""
    hook_attrs = {"attrs": [("NFTA_HOOK_HOOKNUM", hook), ("NFTA_HOOK_PRIORITY", priority)]}
    return message(netlink.nft_chain_msg, netlink.NFT_MSG_NEWCHAIN, {
        "table": table, "name": chain, "hook": hook_attrs, "policy": NF_ACCEPT, "type": kind,
    }, CREATE)


def payload_equals(base: int, offset: int, value: bytes) -> list:
    return load_and_compare("payload", {"base": base, "offset": offset, "len": len(value)},
                            value)


def load_and_compare(expression: str, load: dict, value: bytes,
                     op: int = netlink.NFT_CMP_EQ) -> list:
    """Load into register 1 with `expression`, go on only if it compares to `value` by `op`
    (equal by default)."""
    return [
        netlink.genex(expression, {**load, "dreg": netlink.Regs.NFT_REG_1}),
        netlink.genex("cmp", {"sreg": netlink.Regs.NFT_REG_1, "op": op,
                      "data": {"attrs": [("NFTA_DATA_VALUE", value)]}}),
    ]
