"""Handing the mirrored traffic to the local program, as if the real client sent it.

The local namespace owns the pod's addresses (on `lo`). Each mirrored TCP
connection becomes a kernel socket with IP_TRANSPARENT, bound to the real
client's address and port, connected to pod-address:local-port; the
reassembled bytes are written into it. The kernel does the TCP work toward the
program (windows, acknowledgements). The program's answers are sent from the
pod's address to the client's, and `install_routing` makes every such packet
local: an nft route chain marks it, a rule sends marked packets to a table
whose only route is `local 0.0.0.0/0`, so they come back up to our socket,
which reads and discards them. `remove_routing` takes exactly that away again
(an attached namespace must be given back as it was), recognising each piece by
a marker of its own, so it also clears what a killed session left. Nothing from
the pod's address can leave through the TUN (and the pump's source check would drop it if it tried). A UDP
server bound to a wildcard answers from the tunnel address instead; those
answers are recognised by their destination, a client address:port we recently
delivered from, and kept local the same way.

UDP datagrams go the same way, from a transparent UDP socket bound to the
client's address and port (kept per client port, read and emptied, closed when
idle): the program sees the real source, its answer is absorbed like a TCP
answer, and no ICMP error is ever made for an answer with nowhere to go.

A slow program is the normal case (a debugger): bytes it does not take wait in
its socket buffers, then in a per-connection `Spill` (memory, then an unnamed
file on disk), up to `spill_limit` over the session (default SPILL_LIMIT);
past that the connection with most waiting is given up (`mirror_spill_given_up`).
Only a program that takes nothing at all for STUCK_TIMEOUT (tcp_writer) while bytes
wait gets a reset (`mirror_reset_stuck`).

Every byte of a client's stream is accounted for: `mirror_tcp_bytes` taken in ==
`mirror_delivered_bytes` + the `mirror_undelivered_bytes_<reason>` counters (see
`Ledger`). A byte counts as delivered once the program answered after it was
written, or its connection ended normally (or abortively, for what the program's
kernel had already taken). The client's RST (or a hole in the copies) no longer
throws away what waits: the bytes before it are written first, then the program
gets the reset. A program that closes a connection the client keeps using (a
keep-alive limit, nginx's `keepalive_requests`) gets a new connection from the
same client address:port, and the bytes it did not answer are written again there.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from typing import Callable, Sequence

from mirrord_tun.mirror.connect import address_family, transparent_socket
from mirrord_tun.mirror.reassembly import Flow
from mirrord_tun.mirror.spill import SpillTotals
from mirrord_tun.mirror.tcp_delivery import TcpDelivery
from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns import routes, rtnl
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns")
MARK = 0x6D726E73  # "mrns": our rule is the one with this fwmark, and its table this number
LO_LABEL = "lo:mrdns"  # the label of the pod addresses we put on lo (ours to delete, no others)
LO_PROTO = routes.RTPROT_MIRRORD  # the same for IPv6 addresses, by IFA_PROTO: they have no label
RULE_PRIORITY = 100
NFT_TABLE = "mirrord_ns_mirror"  # one per nft family the pod has addresses of
_NFT_FAMILIES = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
SPILL_LIMIT = 1024 * 1024 * 1024  # per session; past it the connection with most waiting is given up
UDP_IDLE = 30  # seconds
MAX_UDP_SOCKETS = 256
UDP_QUEUE = 64


def install_routing(pod_addrs: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    """Runs in the local namespace; `remove_routing` is its undo.

    Address objects, not strings: they go into an nft script, which must only ever see
    an address there, whatever the agent sent.
    """
    lo = rtnl.index("lo")
    for addr in pod_addrs:
        try:
            if addr.version == 4:
                rtnl.add_address(lo, str(addr), 32, label=LO_LABEL)
            else:  # IPv6 addresses have no label: the address protocol marks ours instead
                rtnl.add_address(lo, str(addr), 128, proto=LO_PROTO)
        except OSError as e:
            if e.errno != errno.EEXIST:  # already local here: not ours, so left alone later
                raise
    script = ""
    for version, (family, addr_type) in _NFT_FAMILIES.items():
        pods = [a for a in pod_addrs if a.version == version]
        if not pods:
            continue
        routes.add_local_delivery(MARK, RULE_PRIORITY, socket.AF_INET if version == 4 else socket.AF_INET6)
        listed = "{ " + ", ".join(map(str, pods)) + " }"
        script += (
            f"table {family} {NFT_TABLE} {{\n"
            # Mirrored UDP peers, remembered from our own deliveries to the pod's address.
            f"  set udp_peers {{ type {addr_type} . inet_service; flags dynamic,timeout; timeout {UDP_IDLE}s; }}\n"
            "  chain output {\n"
            "    type route hook output priority mangle; policy accept;\n"
            f"    {family} saddr {listed} meta mark set {MARK}\n"
            f"    {family} daddr {listed} udp dport 1-65535 update @udp_peers {{ {family} saddr . udp sport }}\n"
            # A UDP server bound to 0.0.0.0 (or ::) answers from the route's source, the tunnel
            # address, not the pod's: catch its answers by where they go instead.
            f"    {family} daddr . udp dport @udp_peers meta mark set {MARK}\n"
            "  }\n}\n"
        )
    nft.run(script)  # one transaction: each table change waits about 16 ms in the kernel


def remove_routing() -> None:
    """Runs in the local namespace: delete what `install_routing` added, and only that.

    Idempotent: each piece is found by its marker (table name, fwmark, table
    number, route protocol, address label or protocol), so the next attach also
    removes a killed one's.
    """
    # Declared first, so deleting an absent table is no error; both in one transaction.
    nft.run("".join(f"table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n"
                    for family, _ in _NFT_FAMILIES.values()))
    routes.remove_local_delivery(MARK)
    lo = rtnl.index("lo")
    for a in rtnl.addresses(socket.AF_INET):
        local = a.address(rtnl.IFA_LOCAL)
        if a.fields[4] == lo and a.text(rtnl.IFA_LABEL) == LO_LABEL and local:
            with contextlib.suppress(OSError):
                rtnl.delete_address(lo, local, a.fields[1])
    with contextlib.suppress(OSError):  # a kernel without IPv6
        for a in rtnl.addresses(socket.AF_INET6):
            local = a.address(rtnl.IFA_ADDRESS)
            if a.fields[4] == lo and a.attrs.get(rtnl.IFA_PROTO) == bytes([LO_PROTO]) and local:
                with contextlib.suppress(OSError):
                    rtnl.delete_address(lo, local, a.fields[1])


class UdpDelivery:
    """Datagrams from one client address:port; answers read and dropped."""

    def __init__(self, owner: "Deliveries", flow: Flow, local_port: int) -> None:
        self._owner = owner
        self.flow = flow
        self._port = local_port
        self._sock: socket.socket | None = None
        self._queue: list[bytes] = []  # while the socket is being made, up to UDP_QUEUE
        self._closed = False
        self.seen = time.monotonic()
        owner.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            sock = await self._owner.ns.acall(transparent_socket, socket.SOCK_DGRAM, address_family(self.flow))
            sock.bind((self.flow.client, self.flow.cport))
        except OSError as e:
            self._owner.counters["mirror_udp_failed"] += 1
            self._owner.log_failure(self.flow, self._port, e)
            self._queue.clear()
            return
        if self._closed:  # expired while the socket was being made
            sock.close()
            return
        self._sock = sock
        self._owner.loop.add_reader(sock.fileno(), self._drain)
        for payload in self._queue:
            self.send(payload)
        self._queue.clear()

    def send(self, payload: bytes) -> None:
        self.seen = time.monotonic()
        c = self._owner.counters
        if self._sock is None:
            if len(self._queue) < UDP_QUEUE:
                self._queue.append(payload)
            else:
                c["mirror_udp_dropped"] += 1
            return
        try:
            self._sock.sendto(payload, (self.flow.pod, self._port))
            c["mirror_udp_datagrams"] += 1
        except OSError:
            c["mirror_udp_dropped"] += 1

    def _drain(self) -> None:
        assert self._sock is not None
        try:
            while True:
                self._owner.counters["mirror_answer_bytes"] += len(self._sock.recv(65536))
        except OSError:
            pass  # EAGAIN, or a queued ICMP error from an earlier send

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._owner.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class Deliveries:
    """All local deliveries of one session; `local_port` maps a pod port to the program's port."""

    def __init__(self, ns: NetNs, local_port: Callable[[int], int], counters: Counters,
                 on_given_up: Callable[[Flow], None], log_failure: Callable[[Flow, int, OSError], None],
                 spill_limit: int = SPILL_LIMIT) -> None:
        self.ns = ns
        self._spill_limit = spill_limit
        self.spilled = SpillTotals()
        self.loop = asyncio.get_running_loop()
        self.counters = counters
        self.log_failure = log_failure
        self._local_port = local_port
        self._on_given_up = on_given_up
        self.tcp: dict[Flow, TcpDelivery] = {}
        self._leaving: set[TcpDelivery] = set()  # still delivering, their port pair already reused
        self.udp: dict[Flow, UdpDelivery] = {}

    def open(self, flow: Flow) -> None:
        old = self.tcp.pop(flow, None)  # taken out first: its end must not touch the new stream
        if old is not None:  # the client reused the port pair; the new connect waits for the old to go
            self._leaving.add(old)
            old.superseded()
        self.tcp[flow] = TcpDelivery(self, flow, self._local_port(flow.port))
        self.counters["mirror_tcp_connections"] += 1

    def data(self, flow: Flow, data: bytes, turn: bool = False) -> None:
        conn = self.tcp.get(flow)
        if conn is None:
            return
        conn.feed(data, turn)
        if self.spilled.waiting > self._spill_limit:
            self.counters["mirror_spill_given_up"] += 1
            victim = max(self.tcp.values(), key=lambda c: len(c.spill))
            log.warning("mirror: %s:%d given up: the local program is more than %d MiB behind",
                        victim.flow.client, victim.flow.cport, self._spill_limit >> 20)
            victim.reset("spill_limit")

    def close(self, flow: Flow, reset: bool) -> None:
        conn = self.tcp.get(flow)
        if conn is None:
            return
        conn.finish(reset)

    def datagram(self, flow: Flow, payload: bytes) -> None:
        sock = self.udp.get(flow)
        if sock is None:
            if len(self.udp) >= MAX_UDP_SOCKETS:
                self.udp.pop(min(self.udp, key=lambda f: self.udp[f].seen)).close()
            sock = self.udp[flow] = UdpDelivery(self, flow, self._local_port(flow.port))
        sock.send(payload)

    def ended(self, conn: TcpDelivery) -> None:
        self._leaving.discard(conn)
        if self.tcp.get(conn.flow) is conn:
            del self.tcp[conn.flow]
            self._on_given_up(conn.flow)

    def expire_udp(self, now: float) -> None:
        for flow in [f for f, s in self.udp.items() if now - s.seen > UDP_IDLE]:
            self.udp.pop(flow).close()

    def close_all(self) -> None:
        for conn in [*self.tcp.values(), *self._leaving]:
            conn.reset("session_end")
        for sock in self.udp.values():
            sock.close()
        self.udp.clear()
