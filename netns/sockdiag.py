"""Which ports a namespace serves, asked of the kernel with sock_diag netlink.

A NETLINK_SOCK_DIAG dump lists the sockets of the namespace the netlink socket
was created in, so callers run `serving_ports` through `NetNs.call`. This is
the small part of the protocol we need (inet_diag_req_v2 / inet_diag_msg from
linux/inet_diag.h); pyroute2's DiagSocket marks its API as unstable.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN, TCP_CLOSE = 10, 7

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48x")  # family, protocol, ext, states; the socket id left zero
# inet_diag_msg: family, state, timer, retrans, then the socket id: sport, dport
# (big-endian), src (16 bytes, IPv4 in the first 4), dst
_SPORT = 4
_SRC = 8


def _dump(family: int, protocol: int, states: int) -> list[tuple[int, bytes, int]]:
    """(sport, src, dport) of every socket of that family/protocol in one of `states`."""
    out: list[tuple[int, bytes, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        body = _REQ.pack(family, protocol, 0, states)
        s.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        alen = 4 if family == socket.AF_INET else 16
        while True:
            data = s.recv(65536)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, pos)[:2]
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, pos + _NLMSG.size)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                m = pos + _NLMSG.size
                sport, dport = struct.unpack_from("!HH", data, m + _SPORT)
                out.append((sport, data[m + _SRC : m + _SRC + alen], dport))
                pos += (length + 3) & ~3
            if not data:
                return out


def serving_ports(addrs: list[str]) -> tuple[set[int], set[int]]:
    """(TCP, UDP) ports with a socket that would receive traffic sent to one of `addrs`.

    TCP: listening sockets. UDP: bound, unconnected sockets (a connected one is a
    client, like a resolver's query socket). Either bound to a wildcard (0.0.0.0 or
    ::) or to one of `addrs` (IPv4, IPv6, or IPv4 as a mapped IPv6 address); a socket bound elsewhere (127.0.0.1,
    our own transparent delivery sockets) never sees mirrored traffic.
    """
    wanted = {ipaddress.ip_address(a).packed for a in addrs}
    wanted |= {bytes(4), bytes(16)}
    wanted |= {b"\0" * 10 + b"\xff\xff" + ipaddress.ip_address(a).packed for a in addrs if "." in a}
    tcp: set[int] = set()
    udp: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for sport, src, _ in _dump(family, socket.IPPROTO_TCP, 1 << TCP_LISTEN):
            if src in wanted:
                tcp.add(sport)
        for sport, src, dport in _dump(family, socket.IPPROTO_UDP, 1 << TCP_CLOSE):
            if src in wanted and dport == 0 and sport:
                udp.add(sport)
    return tcp, udp
