"""The packet path, the same at both ends of the tunnel.

1. The kernel routes a packet into the TUN; `loop.add_reader` wakes the pump's reader.
2. Every packet ready is read at once (up to a batch limit) and checked by `admit_out`, if any.
3. The batch becomes one PACKETS frame: one SSH channel write, not one per packet. Packets
   are read straight into their place in the frame, in a buffer reused for every batch, and
   encrypted from there (sshfast.OutFrame): no copy on our side.
4. The peer splits the frame and checks each packet with `admit_in` (source, version) and
   `vnet_check` (the virtio-net header: the other end is not trusted to write a sane one).
5. Accepted packets are written to the peer's TUN, and its kernel forwards or delivers them.

Steps 1-3 and 4-5 run in C where it was built (native.py): the event loop calls _datapath.c's
pump_out itself for 1-3 (sent with sshfast's C send), and sshfast's open_batch takes 4-5 without a
frame reaching Python; this module's Python is the reference the C follows, and the fallback.

Backpressure: when the channel's send buffer passes its high-water mark, asyncssh
calls `pause_writing`; reading the TUN stops, the kernel's TUN queue fills and
drops, and TCP inside backs off. Nothing here buffers without bound.
"""
from __future__ import annotations

import asyncio
import collections
import io
import ipaddress
import os
import struct
from typing import TYPE_CHECKING, Callable

from mirrord_tun import protocol, sshfast
from mirrord_tun.native import datapath
from mirrord_tun.netns.tun import MAX_PACKET, VNET_HDR_LEN
from mirrord_tun.protocol import Malformed, unpack_packets
from mirrord_tun.sshfast import HEADROOM, TAILROOM, OutFrame

if TYPE_CHECKING:
    from mirrord_tun.channel import Sender

# A batch stops reading past this, so that one more packet (MAX_PACKET) and the 4-byte length
# of each still fit one SSH message (sshopts.MAX_PKTSIZE, 256 KiB): a bigger frame would be split
# by asyncssh's generic path instead of going out whole through sshfast.
BATCH_BYTES = 160 * 1024
_IP = VNET_HDR_LEN  # where the IP header starts in a TUN packet
_FRAME = HEADROOM  # where a batch's frame starts in its buffer: sshfast's header goes before
_BODY = _FRAME + protocol.FRAME_HEADER
_U32 = struct.Struct("!I")

# A check returns None to accept a packet, or the name of the counter it is dropped under.
Check = Callable[["bytes | memoryview"], "str | None"]
Counters = collections.Counter
DROPPED = "dropped_"  # the prefix of the counters of packets and frames not passed on, by reason


def dropped_summary(c: Counters) -> str:
    """What the closing lines say was dropped: "2 spoofed, 1 frames malformed", or "none"."""
    return ", ".join(f"{n} {k[len(DROPPED):].replace('_', ' ')}" for k, n in sorted(c.items())
                     if k.startswith(DROPPED) and n) or "none"


# struct virtio_net_hdr (linux/virtio_net.h), in host byte order as a legacy TUN uses it.
_VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_NEEDS_CSUM, _DATA_VALID = 0x01, 0x02
_GSO_NONE, _GSO_TCPV4, _GSO_TCPV6, _GSO_ECN = 0x00, 0x01, 0x04, 0x80
_TCP, _TCP_CHECK = 6, 16  # protocol number; offsetof(struct tcphdr, check)
_IPV6_HEADER = 40
MIN_GSO_SIZE = 48  # Linux's smallest TCP MSS (tcp_min_snd_mss): less only multiplies segments


def vnet_check(pkt: bytes | memoryview) -> str | None:
    """The virtio-net header of a packet from the peer, before our kernel acts on it.

    With offloads on, the header tells the kernel where to put a checksum and how to
    cut a super-packet into segments; a hostile one aims those writes or multiplies
    the work. Allowed is exactly what a TUN with our offloads hands out: no flag but
    NEEDS_CSUM/DATA_VALID, a checksum inside the packet, and GSO only as TCP over
    IPv4 or over IPv6 without extension headers (the kernel's TCP never adds any),
    with a real segment size and its checksum at the TCP header. The hot path: one
    unpack and a few comparisons.
    """
    size = len(pkt) - _IP
    if size < 20:
        return "dropped_malformed"
    flags, gso, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(pkt)
    if (flags & ~(_NEEDS_CSUM | _DATA_VALID) or hdr_len > size
            or (flags & _NEEDS_CSUM and csum_start + csum_offset + 2 > size)):
        return "dropped_bad_vnet"
    if gso == _GSO_NONE:
        return None
    if gso_size < MIN_GSO_SIZE or not flags & _NEEDS_CSUM or csum_offset != _TCP_CHECK:
        return "dropped_bad_vnet"
    gso &= ~_GSO_ECN
    if gso == _GSO_TCPV4:
        if pkt[_IP] >> 4 != 4 or pkt[_IP + 9] != _TCP or csum_start != (pkt[_IP] & 0x0F) * 4:
            return "dropped_bad_vnet"
        return None
    if (gso != _GSO_TCPV6 or pkt[_IP] >> 4 != 6 or size < _IPV6_HEADER or pkt[_IP + 6] != _TCP
            or csum_start != _IPV6_HEADER):
        return "dropped_bad_vnet"
    return None


def _address_is(v4_offset: int, v6_offset: int, addrs: tuple[str, ...], reason: str) -> Check:
    """Packets whose address at that offset (by IP version) is one of `addrs`; IPv6 packets
    only where an IPv6 address is among them, otherwise dropped as `dropped_ipv6`."""
    parsed = [ipaddress.ip_address(a) for a in addrs]
    # Compared as numbers, never as slices: a packet is often a memoryview (sshfast), and hashing
    # a memoryview slice hashes the whole object under it (a 256 KiB message) first.
    allowed4 = {int(a) for a in parsed if a.version == 4}
    allowed6 = {int(a) for a in parsed if a.version == 6}
    v4_at, v6_end = _U32.unpack_from, v6_offset + 16

    def check(pkt: bytes | memoryview) -> str | None:
        # IPv4 first and with the fewest steps: it is most of the traffic.
        if len(pkt) < _IP + 20:
            return "dropped_malformed"
        version = pkt[_IP] >> 4
        if version == 4:
            return None if v4_at(pkt, v4_offset)[0] in allowed4 else reason
        if version != 6:
            return "dropped_malformed"
        if not allowed6:
            return "dropped_ipv6"
        if len(pkt) < _IP + _IPV6_HEADER:
            return "dropped_malformed"
        return None if int.from_bytes(pkt[v6_offset:v6_end]) in allowed6 else reason

    # The same check for the C path (_datapath.c's parse_check): offsets, the addresses packed.
    check.native = (v4_offset, v6_offset, b"".join(a.packed for a in parsed if a.version == 4),  # type: ignore[attr-defined]
                    b"".join(a.packed for a in parsed if a.version == 6), reason)
    return check


def source_is(*addrs: str) -> Check:
    """Anti-spoofing: a packet whose source is one of `addrs` (IPv4, IPv6, or both)."""
    return _address_is(_IP + 12, _IP + 8, addrs, "dropped_spoofed")


def destination_is(*addrs: str) -> Check:
    return _address_is(_IP + 16, _IP + 24, addrs, "dropped_misaddressed")


class Batch:
    """Packets read straight into their place in one frame, in a buffer reused for every batch:
    from `start` on, each after its length, up to where the reader stopped. A batch stops once
    past `limit`, with room left for one more packet (`max_packet`) and its length, and around
    the frame for sshfast's header and padding, so the frame is encrypted from where it was read."""

    start = _BODY
    limit = _BODY + BATCH_BYTES

    def __init__(self, max_packet: int) -> None:
        self.buf = bytearray(_BODY + BATCH_BYTES + protocol.PACKET_LENGTH + max_packet + TAILROOM)
        self.view = memoryview(self.buf)
        self._frame = OutFrame(self.buf, _FRAME, _FRAME)  # one per batch buffer: `send` keeps no reference

    def frame(self, end: int, kind: int) -> OutFrame:
        """The packets up to `end` as one frame of `kind`, its header written in place."""
        protocol.frame_header_into(self.buf, _FRAME, end - _BODY, kind)
        self._frame.end = end
        return self._frame


class TunPump:
    """Moves packets between one TUN fd and one framed channel."""

    def __init__(self, tun_fd: int, out: Sender, out_kind: int,
                 admit_out: Check | None, admit_in: Check, counters: Counters) -> None:
        self.fd = tun_fd  # -1 once stopped
        # Read through a FileIO: its readinto returns None when the TUN is drained, where
        # os.readv raises, and a raised OSError (with its strerror decoded) cost ~1.3 us of the
        # ~3 reads a new connection's request ends with on each side.
        self._file = io.FileIO(tun_fd, "r", closefd=False)
        self._out = out
        self._kind = out_kind
        self._admit_out = admit_out
        self._admit_in = admit_in
        self.counters = counters
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._batch = Batch(MAX_PACKET)
        # The C path takes a check it knows (`native`, from _address_is) or none; any other check
        # (a test's) keeps that direction in Python.
        out_spec = getattr(admit_out, "native", None)
        self._in_spec = getattr(admit_in, "native", None) if datapath is not None else None
        # What the loop calls when the TUN is readable, and with what: in C (pump_out), a whole
        # wake-up without a Python call in between (right after a wake-up each cost several us:
        # docs/benchmarks.md, ninth pass).
        self._reader: tuple = (self._on_readable,)
        if datapath is not None and (admit_out is None or out_spec is not None):
            self._reader = (datapath.pump_out, tun_fd, self._batch.buf, Batch.start, Batch.limit, MAX_PACKET, out_spec,
                            out_kind, out if sshfast.ENABLED else None, counters, self._unsent, self.pause)

    def start(self) -> None:
        self.resume()

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def resume(self) -> None:
        if not self._reading and self.fd >= 0:
            self._loop.add_reader(self.fd, *self._reader)
            self._reading = True

    def stop(self) -> None:
        self.pause()
        self.fd = -1

    def _on_readable(self) -> None:
        buf, view, read, admit = self._batch.buf, self._batch.view, self._file.readinto, self._admit_out
        pos = Batch.start  # where the next packet's length goes
        count = 0
        c = self.counters
        try:
            while pos < Batch.limit:
                at = pos + protocol.PACKET_LENGTH
                n = read(view[at : at + MAX_PACKET])
                if n is None:
                    break
                if admit is not None and (reason := admit(view[at : at + n])):
                    c[reason] += 1
                    continue
                protocol.packet_length_into(buf, pos, n)
                pos = at + n
                count += 1
        except OSError:
            # The device went away under us (session ending); the owner stops the pump.
            self.pause()
        if count:
            self._send_batch(pos, count)

    def _send_batch(self, pos: int, count: int) -> None:
        """The batch read into the buffer up to `pos` (`count` packets) out as one PACKETS frame."""
        c = self.counters
        c["packets_out"] += count
        c["bytes_out"] += pos - Batch.start - count * protocol.PACKET_LENGTH
        c["frames_out"] += 1
        self._out.write(self._batch.frame(pos, self._kind))

    def _unsent(self, end: int) -> None:
        """pump_out's batch (read and counted up to `end`) that the C could not send itself."""
        self._out.write(self._batch.frame(end, self._kind))

    def native_sink(self) -> tuple[int, tuple] | None:
        """Where the C path (sshfast's Receiver) writes this pump's incoming packets itself: the TUN
        and the check, as `deliver` would; None when it cannot (no C path, a check it does not know,
        stopped)."""
        return None if self._in_spec is None or self.fd < 0 else (self.fd, self._in_spec)

    def count_in(self, packets: int, size: int, drops: dict[str, int] | None) -> None:
        c = self.counters
        c["packets_in"] += packets
        c["bytes_in"] += size
        if drops:
            c.update(drops)

    def deliver(self, body: bytes | memoryview) -> None:
        """Write a PACKETS body from the peer into the TUN (a memoryview of the decrypted message
        when it came through sshfast: its packets are written from there, never copied)."""
        if self._in_spec is not None:
            count, size, drops = datapath.tun_write_batch(self.fd, body, self._in_spec)
            if count < 0:
                self.counters["dropped_frames_malformed"] += 1
            else:
                self.count_in(count, size, drops)
            return
        c = self.counters
        try:
            packets = unpack_packets(body)
        except Malformed:
            c["dropped_frames_malformed"] += 1
            return
        fd, admit, count, size = self.fd, self._admit_in, 0, 0
        for pkt in packets:
            reason = admit(pkt) or vnet_check(pkt)
            if reason:
                c[reason] += 1
                continue
            try:
                os.write(fd, pkt)
            except BlockingIOError:
                c["dropped_tun_full"] += 1
                continue
            except OSError:
                # EINVAL and friends: the kernel refused this packet (a header it still found bad).
                c["dropped_rejected"] += 1
                continue
            count += 1
            size += len(pkt)
        self.count_in(count, size, None)
