"""The packet path, the same at both ends of the tunnel.

1. The kernel routes a packet into the TUN; `loop.add_reader` wakes `_on_readable`.
2. Every packet ready is read at once (up to a batch limit) and checked by `admit_out`.
3. The batch becomes one PACKETS frame: one SSH channel write, not one per packet.
4. The peer splits the frame and checks each packet with `admit_in` (source, version).
5. Accepted packets are written to the peer's TUN, and its kernel forwards or delivers them.

Backpressure: when the channel's send buffer passes its high-water mark, asyncssh
calls `pause_writing`; reading the TUN stops, the kernel's TUN queue fills and
drops, and TCP inside backs off. Nothing here buffers without bound.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
from typing import Callable

from mirrord_tun.netns.tun import MAX_PACKET, VNET_HDR_LEN
from mirrord_tun.protocol import Malformed, frame_packets, unpack_packets

BATCH_BYTES = 256 * 1024
_IP = VNET_HDR_LEN  # where the IP header starts in a TUN packet

# A check returns None to accept a packet, or the name of the counter it is dropped under.
Check = Callable[[bytes], "str | None"]
Counters = collections.Counter


def ipv4_only(pkt: bytes) -> str | None:
    if len(pkt) < _IP + 20:
        return "dropped_malformed"
    version = pkt[_IP] >> 4
    if version == 4:
        return None
    return "dropped_ipv6" if version == 6 else "dropped_malformed"


def _address_is(offset: int, addrs: tuple[str, ...], reason: str) -> Check:
    allowed = {ipaddress.IPv4Address(a).packed for a in addrs}

    def check(pkt: bytes) -> str | None:
        bad = ipv4_only(pkt)
        if bad:
            return bad
        return None if pkt[offset : offset + 4] in allowed else reason

    return check


def source_is(*addrs: str) -> Check:
    """Anti-spoofing: an IPv4 packet whose source is one of `addrs`."""
    return _address_is(_IP + 12, addrs, "dropped_spoofed")


def destination_is(*addrs: str) -> Check:
    return _address_is(_IP + 16, addrs, "dropped_misaddressed")


class TunPump:
    """Moves packets between one TUN fd and one framed channel."""

    def __init__(self, tun_fd: int, send: Callable[[bytes], None], out_kind: int,
                 admit_out: Check, admit_in: Check, counters: Counters) -> None:
        self._fd = tun_fd
        self._send = send
        self._kind = out_kind
        self._admit_out = admit_out
        self._admit_in = admit_in
        self.counters = counters
        self._loop = asyncio.get_running_loop()
        self._reading = False

    def start(self) -> None:
        self.resume()

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume(self) -> None:
        if not self._reading and self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def stop(self) -> None:
        self.pause()
        self._fd = -1

    def _on_readable(self) -> None:
        batch: list[bytes] = []
        size = 0
        c = self.counters
        try:
            while size < BATCH_BYTES:
                pkt = os.read(self._fd, MAX_PACKET)
                reason = self._admit_out(pkt)
                if reason:
                    c[reason] += 1
                    continue
                batch.append(pkt)
                size += len(pkt)
        except BlockingIOError:
            pass
        except OSError:
            # The device went away under us (session ending); the owner stops the pump.
            self.pause()
        if batch:
            c["packets_out"] += len(batch)
            c["bytes_out"] += size
            c["frames_out"] += 1
            self._send(frame_packets(self._kind, batch))

    def deliver(self, body: bytes) -> None:
        """Write a PACKETS body from the peer into the TUN."""
        c = self.counters
        try:
            packets = unpack_packets(body)
        except Malformed:
            c["dropped_frames_malformed"] += 1
            return
        for pkt in packets:
            reason = self._admit_in(pkt)
            if reason:
                c[reason] += 1
                continue
            try:
                os.write(self._fd, pkt)
            except BlockingIOError:
                c["dropped_tun_full"] += 1
                continue
            except OSError:
                # EINVAL and friends: the kernel refused this packet (bad virtio header).
                c["dropped_rejected"] += 1
                continue
            c["packets_in"] += 1
            c["bytes_in"] += len(pkt)
