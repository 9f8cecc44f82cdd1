"""Inbound mirror, local side: ports to subscribe, streams to rebuild, deliveries to make.

Frames flow: agent capture -> MIRROR frame -> `Mirror.deliver` -> reassembly
(pure, per TCP stream) -> events -> delivery (transparent sockets toward the
program). See "Inbound mirror" in README.md.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.mirror.delivery import Deliveries, install_routing, remove_routing
from mirrord_tun.mirror.ports import PortWatcher
from mirrord_tun.mirror.reassembly import Close, Data, Datagram, Flow, Open, Reassembler
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns")
EXPIRE_INTERVAL = 1.0


class Mirror:
    """The mirror of one session; `start` after the namespace exists, `stop` before it goes.

    `stop` takes the addresses, rule, route and nft table `start` put in the
    namespace away again: an attached namespace must be given back as it was.
    """

    def __init__(self, ns: NetNs, pod_addrs: list[str], mapping: dict[int, int],
                 send: Callable[[bytes], None], counters: Counters) -> None:
        self._ns = ns
        self._pod_addrs = pod_addrs
        self.counters = counters
        self.ports = PortWatcher(ns, pod_addrs, mapping, lambda p: send(protocol.subscribe(p)))
        self.streams = Reassembler(counters)
        self.deliveries = Deliveries(ns, self.ports.local_port, counters, self._given_up, self._failed)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._ns.acall(install_routing, self._pod_addrs)
        self._tasks = [asyncio.create_task(self.ports.run()), asyncio.create_task(self._expire())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.deliveries.close_all()
        await self._ns.acall(remove_routing)
        log.info("mirror: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items())
                                         if k.startswith("mirror_")) or "nothing")

    def deliver(self, body: bytes) -> None:
        """A MIRROR frame from the agent."""
        try:
            packets = protocol.unpack_packets(body)
        except protocol.Malformed:
            self.counters["dropped_frames_malformed"] += 1
            return
        now = time.monotonic()
        d = self.deliveries
        for pkt in packets:
            for ev in self.streams.feed(pkt, now):
                if isinstance(ev, Data):
                    d.data(ev.flow, ev.data)
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
