"""Inbound mirror, local side: ports to subscribe, streams to rebuild, deliveries to make.

Frames flow: agent capture -> MIRROR frame -> `Mirror.deliver` -> `admit` ->
reassembly (pure, per TCP stream) -> events -> delivery (transparent sockets
toward the program). See docs/mirror.md.

The agent is not trusted to choose what `run`'s transparent sockets do: `admit`
passes only copies of TCP or UDP sent to a pod address on a port we subscribed,
from an address that could be a real client (never loopback, multicast,
link-local or one of the session's own addresses), so nothing reaches a
127.0.0.1-only listener, a port never mirrored, or looks like it came from inside.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.mirror.delivery import SPILL_LIMIT, Deliveries, install_routing, remove_routing
from mirrord_tun.mirror.ports import PortWatcher
from mirrord_tun.mirror.reassembly import Close, Data, Datagram, Flow, Open, Reassembler
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns")
EXPIRE_INTERVAL = 1.0
_L4_HEADER = {socket.IPPROTO_TCP: 20, socket.IPPROTO_UDP: 8}


def admit(pkt: bytes, pods: frozenset[bytes], own: frozenset[bytes], subscribed: Callable[[int], bool]) -> str | None:
    """None for a copy to deliver, else the counter it is dropped under.

    `pods`: the packed pod addresses (IPv4 and IPv6) this mirror serves; `own`: every address
    of the session (pod and tunnel addresses); `subscribed(port)`: whether we asked for that pod port.
    """
    version = pkt[0] >> 4 if pkt else 0
    if version == 4 and len(pkt) >= 20:
        l4 = _L4_HEADER.get(pkt[9])
        if l4 is None:
            return "dropped_mirror_protocol"
        hlen = (pkt[0] & 0x0F) * 4
        total = int.from_bytes(pkt[2:4], "big")
        # total 0: a GRO packet past 64 KiB (BIG TCP) has no length of its own; the copy is whole.
        if (hlen < 20 or hlen + l4 > len(pkt) or (total and not hlen + l4 <= total <= len(pkt))
                or int.from_bytes(pkt[6:8], "big") & 0x1FFF):  # a later fragment: no ports in it
            return "dropped_mirror_malformed"
        src, dst = pkt[12:16], pkt[16:20]
        bogus_source = protocol.not_unicast(src)
    elif version == 6 and len(pkt) >= 40:
        l4 = _L4_HEADER.get(pkt[6])  # an extension header first is not a protocol we take
        if l4 is None:
            return "dropped_mirror_protocol"
        hlen = 40
        payload = int.from_bytes(pkt[4:6], "big")  # 0 likewise for BIG TCP
        if hlen + l4 > len(pkt) or (payload and not l4 <= payload <= len(pkt) - hlen):
            return "dropped_mirror_malformed"
        src, dst = pkt[8:24], pkt[24:40]
        bogus_source = _not_unicast6(src)
    else:
        return "dropped_mirror_malformed"
    if dst not in pods:
        return "dropped_mirror_destination"
    if not subscribed(int.from_bytes(pkt[hlen + 2 : hlen + 4], "big")):
        return "dropped_mirror_port"
    if src in own or bogus_source or not pkt[hlen] | pkt[hlen + 1]:
        return "dropped_mirror_source"
    return None


def summary(c: Counters) -> str:
    """The session's closing line for the mirror: what was copied, delivered, and lost why."""
    if not c["mirror_tcp_connections"] and not c["mirror_udp_datagrams"]:
        return ""
    line = (f"mirrored: {c['mirror_tcp_connections']} connections, {c['mirror_tcp_bytes']} bytes copied, "
            f"{c['mirror_delivered_bytes']} delivered")
    if c["mirror_reconnects"]:
        line += f" ({c['mirror_reconnects']} new connections after the program closed one)"
    if c["mirror_udp_datagrams"] or c["mirror_udp_dropped"]:
        line += f"; {c['mirror_udp_datagrams']} datagrams"
    lost = [f"{v} bytes ({k.removeprefix(_UNDELIVERED)})" for k, v in sorted(c.items())
            if k.startswith(_UNDELIVERED) and v]
    lost += [f"{c[k]} {what}" for k, what in _OTHER_LOSSES if c[k]]
    return line + ("; not delivered: " + ", ".join(lost) if lost else "")


_UNDELIVERED = "mirror_undelivered_bytes_"
_OTHER_LOSSES = (("mirror_gap_bytes_dropped", "bytes behind a hole in the copies"),
                 ("mirror_joined_midstream", "connections joined mid-stream"),
                 ("mirror_udp_dropped", "datagrams"))


def _not_unicast6(packed: bytes) -> bool:
    """An IPv6 source no real client has: unspecified, loopback, multicast, link-local (a client
    on the pod's link would reach it at that scope only, never at a pod address we mirror), or
    IPv4-mapped (which would pass an IPv4 address through the IPv6 checks)."""
    return (packed[0] == 0xFF or (packed[0] == 0xFE and packed[1] & 0xC0 == 0x80)
            or packed[:15] == bytes(15) or packed[:12] == bytes(10) + b"\xff\xff")


class Mirror:
    """The mirror of one session; `start` after the namespace exists, `stop` before it goes.

    `stop` takes the addresses, rule, route and nft table `start` put in the
    namespace away again: an attached namespace must be given back as it was.
    """

    def __init__(self, ns: NetNs, pod_addrs: list[str], own_addrs: list[str], mapping: dict[int, int],
                 send: Callable[[bytes], None], counters: Counters, spill_limit: int = SPILL_LIMIT) -> None:
        """`pod_addrs`: the pod addresses to mirror, IPv4 and IPv6; `own_addrs`: every address of the session
        (all the pod's, mirrored or not, and both tunnel ends): no copy may come from one;
        `spill_limit`: bytes the program may fall behind over all connections before one is given up."""
        self._ns = ns
        self._pod_addrs = [ipaddress.ip_address(a) for a in pod_addrs]
        self._pods = frozenset(a.packed for a in self._pod_addrs)
        self._own = frozenset(ipaddress.ip_address(a).packed for a in own_addrs if a)
        self.counters = counters
        self.ports = PortWatcher(ns, pod_addrs, mapping, lambda p: send(protocol.subscribe(p)))
        self.streams = Reassembler(counters)
        self.deliveries = Deliveries(ns, self.ports.local_port, counters, self._given_up, self._failed,
                                     spill_limit)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._ns.acall(install_routing, self._pod_addrs)
        self._tasks = [asyncio.create_task(self.ports.run()), asyncio.create_task(self._expire())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.deliveries.close_all()
        if not self._ns.private:  # (the nft table's removal alone waits ~16 ms in the kernel)
            await self._ns.acall(remove_routing)
        log.info("mirror: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items())
                                         if k.startswith("mirror_")) or "nothing")
        lost = summary(self.counters)
        if lost:
            log.log(logging.WARNING if "not delivered" in lost else logging.INFO, "%s", lost)

    def deliver(self, body: bytes) -> None:
        """A MIRROR frame from the agent."""
        try:
            packets = protocol.unpack_packets(body)
        except protocol.Malformed:
            self.counters["dropped_frames_malformed"] += 1
            return
        now = time.monotonic()
        d = self.deliveries
        c = self.counters
        pods, own = self._pods, self._own
        subscribed = lambda port: self.ports.subscribed(port, now)  # noqa: E731
        for pkt in packets:
            reason = admit(pkt, pods, own, subscribed)
            if reason:
                c[reason] += 1
                continue
            for ev in self.streams.feed(pkt, now):
                if isinstance(ev, Data):
                    d.data(ev.flow, ev.data, ev.turn)
                elif isinstance(ev, Open):
                    d.open(ev.flow)
                elif isinstance(ev, Close):
                    d.close(ev.flow, ev.reset)
                elif isinstance(ev, Datagram):
                    d.datagram(ev.flow, ev.payload)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            now = time.monotonic()
            for ev in self.streams.expire(now):
                assert isinstance(ev, Close)
                self.deliveries.close(ev.flow, ev.reset)
            self.deliveries.expire_udp(now)

    def _given_up(self, flow: Flow) -> None:
        self.streams.forget(flow, time.monotonic())

    def _failed(self, flow: Flow, port: int, err: OSError) -> None:
        log.debug("mirror %s:%d -> local port %d: %s", flow.client, flow.cport, port, err)
