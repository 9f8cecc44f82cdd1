"""The client's byte streams, rebuilt from copies of the packets that reached the pod.

Pure: no sockets, no clock of its own (callers pass `now`), so it is tested
without root. The capture sees only the client→pod direction, and sees what
the pod saw: retransmissions, duplicates, reordering and overlapping segments
(a retransmission may re-cut the stream differently). A stream is followed
from its SYN, which gives the initial sequence number; every byte is emitted
exactly once, in order. A connection first seen after its SYN cannot be placed
in a stream (the offset of its bytes is unknown), so it is ignored until it
ends, never guessed at.

Turns: a client that sent a request and waits for the answer acknowledges the
server's answer with its next segment, so a data segment whose acknowledgement
number moved on since the stream's previous one starts a new turn (`Data.turn`):
delivery uses it to give the program one request at a time (mirror/tcp_writer.py).
No turn is marked inside out-of-order data: it is only a hint.

A hole the copies never fill (the capture dropped a packet the pod received,
so the client will not resend it) would hold data forever: a stream holding
out-of-order data that makes no progress for GAP_TIMEOUT, or holding more than
MAX_HELD, is ended with a reset, as is any stream once all streams together
hold more than MAX_TOTAL_HELD.
"""
from __future__ import annotations

import heapq
import socket
import struct
from typing import NamedTuple

from mirrord_tun.pump import Counters

MAX_HELD = 8 * 1024 * 1024
MAX_TOTAL_HELD = 64 * 1024 * 1024
MAX_STREAMS = 4096
GAP_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # a stream with no packet for this long lost its FIN/RST copies
IGNORE_TIMEOUT = 120.0

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_SEQ_MOD = 1 << 32


class Flow(NamedTuple):
    client: str
    cport: int
    pod: str
    port: int  # the pod port the client connected to


class Open(NamedTuple):
    flow: Flow


class Data(NamedTuple):
    flow: Flow
    data: bytes
    turn: bool = False  # the client heard from the server since its previous bytes


class Close(NamedTuple):
    flow: Flow
    reset: bool  # False: the client's FIN, after all its bytes; True: RST or given up


class Datagram(NamedTuple):
    flow: Flow
    payload: bytes


Event = Open | Data | Close | Datagram


class Stream:
    """One direction of one TCP connection, in stream offsets (0 = first byte after the SYN)."""

    def __init__(self, isn: int, now: float) -> None:
        self.isn = isn
        self.delivered = 0  # offset of the next byte to emit
        self.fin_at: int | None = None
        self.held = 0  # bytes waiting beyond a hole
        self._ooo: list[tuple[int, bytes]] = []  # heap of (offset, bytes)
        self.seen = now
        self.stalled_since: float | None = None
        self.ack: int | None = None  # of the last segment that carried in-order bytes
        self.turn = False  # the bytes `add` returned start a new turn

    def offset(self, seq: int) -> int:
        """Unwrap a 32-bit sequence number to the offset nearest the delivery point."""
        rel = (seq - self.isn - 1) % _SEQ_MOD
        delta = (rel - self.delivered + (_SEQ_MOD >> 1)) % _SEQ_MOD - (_SEQ_MOD >> 1)
        return self.delivered + delta

    def add(self, seq: int, ack: int | None, payload: bytes, fin: bool, now: float) -> bytes:
        """Take one segment (`ack`: its acknowledgement number, None without ACK); return the
        bytes it makes contiguous (often empty)."""
        self.seen = now
        self.turn = False
        off = self.offset(seq)
        end = off + len(payload)
        if fin and self.fin_at is None:
            self.fin_at = end
        if end <= self.delivered:
            return b""  # a duplicate: every byte already emitted
        if off > self.delivered:
            heapq.heappush(self._ooo, (off, payload))
            self.held += len(payload)
            if self.stalled_since is None:
                self.stalled_since = now
            return b""
        out = [payload[self.delivered - off :]]
        if ack is not None:
            self.turn = self.ack is not None and ack != self.ack and self.delivered > 0
            self.ack = ack
        self.delivered = end
        while self._ooo and self._ooo[0][0] <= self.delivered:
            start, seg = heapq.heappop(self._ooo)
            self.held -= len(seg)
            if start + len(seg) > self.delivered:
                out.append(seg[self.delivered - start :])
                self.delivered = start + len(seg)
        self.stalled_since = now if self._ooo else None
        return b"".join(out)

    @property
    def finished(self) -> bool:
        return self.fin_at is not None and self.delivered >= self.fin_at


def parse_ip(pkt: bytes) -> tuple[str, str, int, int, int] | None:
    """(source, destination, L4 protocol, header length, end of the IP payload) of an IPv4
    packet or an IPv6 packet without extension headers (its next header is the L4 protocol);
    None if it is neither. A GRO super-packet may carry a length the copy exceeds (or 0, past
    64 KiB): the copy is trusted then."""
    version = pkt[0] >> 4 if pkt else 0
    if version == 4 and len(pkt) >= 20:
        hlen = (pkt[0] & 0x0F) * 4
        total = int.from_bytes(pkt[2:4], "big")
        end = total if hlen <= total <= len(pkt) else len(pkt)
        return socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20]), pkt[9], hlen, end
    if version == 6 and len(pkt) >= 40:
        total = 40 + int.from_bytes(pkt[4:6], "big")
        end = total if 40 < total <= len(pkt) else len(pkt)
        return (socket.inet_ntop(socket.AF_INET6, pkt[8:24]), socket.inet_ntop(socket.AF_INET6, pkt[24:40]),
                pkt[6], 40, end)
    return None


class Reassembler:
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.streams: dict[Flow, Stream] = {}
        self._ignored: dict[Flow, float] = {}  # joined mid-stream or already ended -> last seen
        self.held = 0

    def feed(self, pkt: bytes, now: float) -> list[Event]:
        """Events for one captured IPv4 or IPv6 packet (TCP or UDP)."""
        c = self.counters
        ip = parse_ip(pkt)
        if ip is None:
            c["mirror_dropped_malformed"] += 1
            return []
        src, dst, proto, hlen, end = ip
        if proto == socket.IPPROTO_UDP and end - hlen >= 8:
            sport, dport = struct.unpack_from("!HH", pkt, hlen)
            return [Datagram(Flow(src, sport, dst, dport), pkt[hlen + 8 : end])]
        if proto != socket.IPPROTO_TCP or end - hlen < 20:
            c["mirror_dropped_malformed"] += 1
            return []
        sport, dport, seq, ack = struct.unpack_from("!HHII", pkt, hlen)
        doff = (pkt[hlen + 12] >> 4) * 4
        flags = pkt[hlen + 13]
        if doff < 20 or hlen + doff > end:
            c["mirror_dropped_malformed"] += 1
            return []
        return self._tcp(Flow(src, sport, dst, dport), seq, ack if flags & _ACK else None, flags,
                         pkt[hlen + doff : end], now)

    def _tcp(self, flow: Flow, seq: int, ack: int | None, flags: int, payload: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        stream = self.streams.get(flow)
        if flags & _SYN and not flags & _ACK:
            if stream is not None and stream.isn == seq:
                return []  # a retransmitted SYN
            if stream is not None:  # the port pair was reused: the old stream lost its end
                events += self._end(flow, reset=True)
            self._ignored.pop(flow, None)
            if len(self.streams) >= MAX_STREAMS:
                oldest = min(self.streams, key=lambda f: self.streams[f].seen)
                self.counters["mirror_evicted_streams"] += 1
                events += self._end(oldest, reset=True)
            self.streams[flow] = Stream(seq, now)
            events.append(Open(flow))
            seq = (seq + 1) % _SEQ_MOD
            stream = self.streams[flow]
            if not payload and not flags & _FIN:
                return events
        if stream is None:
            if flow not in self._ignored and not flags & _RST:
                self.counters["mirror_joined_midstream"] += 1
            if flags & _RST:
                self._ignored.pop(flow, None)
            else:
                self._ignored[flow] = now
            return events
        if flags & _RST:
            return events + self._end(flow, reset=True)
        before = stream.held
        data = stream.add(seq, ack, payload, bool(flags & _FIN), now)
        self.held += stream.held - before
        if data:
            events.append(Data(flow, data, stream.turn))
        if stream.finished:
            events += self._end(flow, reset=False)
        elif stream.held > MAX_HELD or self.held > MAX_TOTAL_HELD:
            self.counters["mirror_overflow_aborts"] += 1
            events += self._end(flow, reset=True)
        return events

    def _end(self, flow: Flow, reset: bool) -> list[Event]:
        stream = self.streams.pop(flow)
        self.held -= stream.held
        self.counters["mirror_gap_bytes_dropped"] += stream.held  # beyond a hole: never reach the program
        self._ignored[flow] = stream.seen  # late copies (the final ACK, retransmitted FIN) stay quiet
        return [Close(flow, reset)]

    def forget(self, flow: Flow, now: float) -> None:
        """The local side gave this connection up: ignore the rest of it."""
        stream = self.streams.pop(flow, None)
        if stream is not None:
            self.held -= stream.held
            self._ignored[flow] = now

    def expire(self, now: float) -> list[Event]:
        """Streams stuck behind a hole or silent too long end with a reset; old ignores are dropped."""
        events: list[Event] = []
        for flow, stream in list(self.streams.items()):
            if stream.stalled_since is not None and now - stream.stalled_since > GAP_TIMEOUT:
                self.counters["mirror_gap_aborts"] += 1
                events += self._end(flow, reset=True)
            elif now - stream.seen > IDLE_TIMEOUT:
                events += self._end(flow, reset=True)
        for flow, seen in list(self._ignored.items()):
            if now - seen > IGNORE_TIMEOUT:
                del self._ignored[flow]
        return events
