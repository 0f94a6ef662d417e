"""pyroute2, imported on first use.  Importing its package costs about 80 ms (it loads its
whole API), which a dump or restore of a job without sockets or a network of its own — most
small jobs — never needs: `netlink.NAME` is pyroute2's NAME, looked up once."""

from __future__ import annotations

import importlib

# Kernel ABI constants that module-level code needs, here so that it needs no pyroute2:
# netlink header flags (linux/netlink.h), TCP states as sock_diag numbers them, what a unix
# sock_diag request asks to show (linux/unix_diag.h), netfilter families, nft_cmp_ops.
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x200, 0x400, 0x800
SS_SYN_RECV, SS_TIME_WAIT, SS_ALL = 3, 6, 0xFFF
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = (
    0x1, 0x2, 0x4, 0x8, 0x10)
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NFT_CMP_EQ = 0

_WHERE = {
    "pyroute2": ("DiagSocket", "IPRoute"),
    "pyroute2.netlink.diag": ("SOCK_DESTROY", "inet_diag_req"),
    "pyroute2.netlink.exceptions": ("NetlinkError",),
    "pyroute2.netlink.nfnetlink": ("NFNL_SUBSYS_NFTABLES", "nfgen_msg"),
    "pyroute2.netlink.nfnetlink.nftsocket": ("NFT_MSG_DELTABLE", "NFT_MSG_NEWCHAIN",
                                             "NFT_MSG_NEWRULE", "NFT_MSG_NEWTABLE", "Cmp", "Meta",
                                             "Regs", "nft_chain_msg", "nft_rule_msg",
                                             "nft_table_msg"),
    "pyroute2.nftables.expressions": ("genex", "masq", "verdict"),
    "pyroute2.nftables.main": ("NFTables",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value
