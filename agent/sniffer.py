"""The mirror capture: copies of the packets that reach the pod on the subscribed ports.

One AF_PACKET socket per session and address family the pod has, opened in
the target namespace (a packet socket sees the devices of the namespace it was
created in), filtered in the kernel by agent/bpf.py. The sockets only copy: the
pod's kernel processes every packet as if we were not there. Captured packets
are bare IPv4 or IPv6 packets (SOCK_DGRAM strips the link header); after GRO one
may be a coalesced TCP segment larger than the MTU, which the client's
reassembly takes as it is.

Two sockets bound to ETH_P_IP and ETH_P_IPV6 rather than one to ETH_P_ALL: an
ETH_P_ALL socket is also a transmit tap, and the kernel clones every packet the
pod sends to run the filter on it (dev_queue_xmit_nit), whereas protocol-bound
sockets see received packets only. IPv6 packets with an extension header before
TCP/UDP arrive cut short (bpf.EXT_SNAPLEN) and are counted as
mirror_skipped_ipv6_ext, not sent: their ports could not be checked.

Copies travel as MIRROR frames on the session channel, batched like PACKETS and like them
read straight into their place in the frame (pump.Batch), which sshfast encrypts from there:
no bytes object per copy (each recvfrom allocated SNAPLEN, 256 KiB) and no join.
While the channel is paused (its send buffer is full) the capture stops
reading: copies wait in the socket's kernel buffer (RCVBUF, bounded), and once
it is full the kernel drops further copies and counts them (PACKET_STATISTICS,
reported as mirror_dropped_kernel). Nothing queues in Python, and the pod's
own packets are never held back: the capture only ever gets clones.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.agent import bpf
from mirrord_tun.agent.dataplane import TUN_PREFIX
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import AgentMsg
from mirrord_tun.pump import Batch, Counters
from mirrord_tun.sshfast import OutFrame

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_RCVBUFFORCE = 33  # not in Python's socket module
log = logging.getLogger("mirrord-ns.agent")
COALESCE = 0.002  # seconds copies may wait in the kernel before a drain
DRAIN_BYTES = 4 * 1024 * 1024  # per drain, so one busy capture cannot hold the event loop
RCVBUF = 64 * 1024 * 1024  # absorbs a burst while the event loop is busy elsewhere


class Sniffer:
    """A session's capture; `subscribe` may be called any time, `aclose` ends it."""

    def __init__(self, ns: NetNs, pod_addrs: list[str], send: Callable[[OutFrame], None],
                 counters: Counters) -> None:
        self._ns = ns
        self._pod_addrs = pod_addrs
        self._send = send
        self.counters = counters
        self._socks: list[socket.socket] = []  # one per address family of the pod
        self._protos: list[int] = []  # their ETH_P_*
        self._opened = False
        self._wanted: set[int] = set()
        self._applied: set[int] = set()
        self._applying: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._reading = False
        self._drain_at: asyncio.TimerHandle | None = None
        self._batch = Batch(bpf.SNAPLEN)

    def subscribe(self, ports: set[int]) -> None:
        """Mirror exactly `ports` from now on (the sockets open with the first port wanted)."""
        self._wanted = ports
        if self._applying is None or self._applying.done():
            self._applying = asyncio.create_task(self._apply())

    async def _apply(self) -> None:
        # Loops so that subscriptions arriving while the namespace thread works are not lost.
        # No socket until a port is wanted: an open one runs its filter on every packet the pod
        # receives (the tunnel's own included), for a session that mirrors nothing.
        try:
            while self._wanted != self._applied or (self._wanted and not self._opened):
                wanted = self._wanted
                if wanted and not self._opened:
                    families = {ipaddress.ip_address(a).version for a in self._pod_addrs}
                    for proto in [p for version, p in ((4, ETH_P_IP), (6, ETH_P_IPV6)) if version in families]:
                        if proto not in self._protos:  # a failed attempt may have opened one already
                            self._socks.append(await self._ns.acall(_open_socket, proto))
                            self._protos.append(proto)
                    self._opened = True
                    self._watch()
                for sock in self._socks:
                    await self._ns.acall(_set_filter, sock, self._pod_addrs, wanted)
                self._applied = wanted
        except OSError as e:
            log.warning("mirror capture: %s", e)
            self.counters["mirror_capture_errors"] += 1

    def pause(self) -> None:
        if not self._paused:
            self.counters["mirror_paused"] += 1
        self._paused = True
        self._watch()

    def resume(self) -> None:
        self._paused = False
        self._watch()

    def _watch(self) -> None:
        """Wait for copies exactly when there are sockets, room on the channel, and no drain pending."""
        want = bool(self._socks) and not self._paused and self._drain_at is None
        if want and not self._reading:
            for sock in self._socks:
                self._loop.add_reader(sock.fileno(), self._on_readable)
        elif self._reading and not want:
            for sock in self._socks:
                self._loop.remove_reader(sock.fileno())
        self._reading = want

    async def aclose(self) -> None:
        if self._applying:
            self._applying.cancel()
        if self._drain_at:
            self._drain_at.cancel()
            self._drain_at = None
        self._paused = True
        self._watch()
        self.counters.update(self.kernel_stats())
        for sock in self._socks:
            sock.close()
        self._socks, self._protos, self._opened = [], [], False

    def kernel_stats(self) -> dict[str, int]:
        """What the kernel passed the filter, and dropped for a full buffer, since the last call."""
        if not self._socks:
            return {}
        packets = drops = 0
        for sock in self._socks:
            p, d = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            packets, drops = packets + p, drops + d
        return {"mirror_kernel_packets": packets, "mirror_dropped_kernel": drops}

    def _on_readable(self) -> None:
        # Let copies gather for a moment: fewer, fuller frames, and the agent stays off
        # the CPU while the pod is still busy with the request that woke us.
        self._drain_at = self._loop.call_later(COALESCE, self._drain)
        self._watch()

    def _drain(self) -> None:
        self._drain_at = None
        c = self.counters
        batch = self._batch
        buf, view, start, limit = batch.buf, batch.view, batch.start, batch.limit
        for sock in self._socks:
            budget = DRAIN_BYTES
            recv = sock.recvfrom_into
            while sock in self._socks and not self._paused and budget > 0:
                pos, count = start, 0  # where the next copy's length goes; copies in the batch
                try:
                    while pos < limit:
                        at = pos + protocol.PACKET_LENGTH
                        n, addr = recv(view[at : at + bpf.SNAPLEN])
                        if addr[0].startswith(TUN_PREFIX):
                            # A TUN made after the filter was built: the kernel could not know it.
                            c["mirror_skipped_tun"] += 1
                        elif view[at] >> 4 == 6 and view[at + 6] in bpf.IPV6_EXTENSIONS:
                            c["mirror_skipped_ipv6_ext"] += 1
                        else:
                            protocol.packet_length_into(buf, pos, n)
                            pos, count = at + n, count + 1
                except BlockingIOError:
                    budget = 0
                if count:
                    size = pos - start - count * protocol.PACKET_LENGTH
                    c["mirror_packets"] += count
                    c["mirror_bytes"] += size
                    budget -= size
                    self._send(batch.frame(pos, AgentMsg.MIRROR))  # may pause us
        self._watch()


def _open_socket(proto: int) -> socket.socket:
    """Runs in the target namespace: the packet socket sees that namespace's devices."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(proto))
    try:
        # Reject everything first, then drain what queued before the filter existed.
        bpf.attach(sock, bpf.program([], set(), set()))
        sock.setblocking(False)
        try:
            while True:
                sock.recv(1)
        except BlockingIOError:
            pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    except BaseException:
        sock.close()
        raise
    return sock


def _set_filter(sock: socket.socket, pod_addrs: list[str], ports: set[int]) -> None:
    """Runs in the target namespace; the kernel swaps the old filter for the new one atomically."""
    # TUN indexes are read at every rebuild: sessions come and go in between.
    tuns = {i for i, name in socket.if_nameindex() if name.startswith(TUN_PREFIX)}
    bpf.attach(sock, bpf.program(pod_addrs, ports, tuns))
