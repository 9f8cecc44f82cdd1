"""Which ports a namespace serves, asked of the kernel with sock_diag netlink.

A NETLINK_SOCK_DIAG dump lists the sockets of the namespace the netlink socket
was created in, so a `Probe` makes its socket there once and asks from the caller's
thread afterwards. This is
the small part of the protocol we need (inet_diag_req_v2 / inet_diag_msg from
linux/inet_diag.h); pyroute2's DiagSocket marks its API as unstable.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mirrord_tun.netns.namespace import NetNs

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


def _dump(s: socket.socket, seq: int, family: int, protocol: int, states: int) -> list[tuple[int, bytes, int]]:
    """(sport, src, dport) of every socket of that family/protocol in one of `states`; messages
    of another sequence number (what an interrupted earlier dump left) are skipped."""
    out: list[tuple[int, bytes, int]] = []
    body = _REQ.pack(family, protocol, 0, states)
    s.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    alen = 4 if family == socket.AF_INET else 16
    while True:
        data = s.recv(65536)
        pos = 0
        while pos + _NLMSG.size <= len(data):
            length, kind, _flags, msg_seq, _pid = _NLMSG.unpack_from(data, pos)
            if msg_seq == seq:
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, pos + _NLMSG.size)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                m = pos + _NLMSG.size
                sport, dport = struct.unpack_from("!HH", data, m + _SPORT)
                out.append((sport, data[m + _SRC : m + _SRC + alen], dport))
            pos += max((length + 3) & ~3, _NLMSG.size)
        if not data:
            return out


def _open() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


class Probe:
    """sock_diag of one namespace. The mirror and steal ask every 0.25 s; a new socket and a
    hand-off to the namespace's thread per ask cost an idle session ~3 ms of CPU a second, so
    the socket is made in the namespace once and asked from the caller's thread: the kernel
    answers a dump inside recv(), so an ask never waits on anyone."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0

    @classmethod
    async def open(cls, ns: NetNs) -> "Probe":
        return cls(await ns.acall(_open))

    def close(self) -> None:
        self._sock.close()

    def serving_ports(self, addrs: list[str]) -> tuple[set[int], set[int]]:
        """(TCP, UDP) ports with a socket that would receive traffic sent to one of `addrs`.

        TCP: listening sockets. UDP: bound, unconnected sockets (a connected one is a
        client, like a resolver's query socket). Either bound to a wildcard (0.0.0.0 or
        ::) or to one of `addrs` (IPv4, IPv6, or IPv4 as a mapped IPv6 address); a socket bound
        elsewhere (127.0.0.1, our own transparent delivery sockets) never sees mirrored traffic.
        """
        wanted = {ipaddress.ip_address(a).packed for a in addrs}
        wanted |= {bytes(4), bytes(16)}
        wanted |= {b"\0" * 10 + b"\xff\xff" + ipaddress.ip_address(a).packed for a in addrs if "." in a}
        tcp: set[int] = set()
        udp: set[int] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for sport, src, _ in self._dump(family, socket.IPPROTO_TCP, 1 << TCP_LISTEN):
                if src in wanted:
                    tcp.add(sport)
            for sport, src, dport in self._dump(family, socket.IPPROTO_UDP, 1 << TCP_CLOSE):
                if src in wanted and dport == 0 and sport:
                    udp.add(sport)
        return tcp, udp

    def _dump(self, family: int, protocol: int, states: int) -> list[tuple[int, bytes, int]]:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return _dump(self._sock, self._seq, family, protocol, states)

