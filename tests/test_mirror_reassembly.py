"""Reassembly of mirrored TCP streams: pure, no root, no sockets."""
from __future__ import annotations

import random
import socket
import struct

from mirrord_tun.mirror import reassembly
from mirrord_tun.mirror.reassembly import Close, Data, Datagram, Flow, Open, Reassembler
from mirrord_tun.pump import Counters

CLIENT, POD = "198.18.0.30", "198.18.0.10"
FLOW = Flow(CLIENT, 40000, POD, 80)
SYN, FIN, RST, ACK, PSH = 0x02, 0x01, 0x04, 0x10, 0x08


def _ip(proto: int, l4: bytes, src: str = CLIENT, dst: str = POD) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + l4


def tcp(seq: int, flags: int, payload: bytes = b"", sport: int = 40000) -> bytes:
    return _ip(6, struct.pack("!HHIIBBHHH", sport, 80, seq % (1 << 32), 0, 5 << 4, flags, 65535, 0, 0)
               + payload)


def run(packets: list[bytes], r: Reassembler | None = None, now: float = 0.0) -> tuple[list[object], bytes]:
    r = r or Reassembler(Counters())
    events: list[object] = []
    for p in packets:
        events += r.feed(p, now)
    data = b"".join(e.data for e in events if isinstance(e, Data))
    return events, data


def segments(isn: int, body: bytes, size: int) -> list[bytes]:
    return [tcp(isn + 1 + i, ACK | PSH, body[i : i + size]) for i in range(0, len(body), size)]


def test_in_order_stream_and_fin() -> None:
    body = random.randbytes(10000)
    events, data = run([tcp(1000, SYN), *segments(1000, body, 1448), tcp(1001 + len(body), FIN | ACK)])
    assert data == body
    assert events[0] == Open(FLOW)
    assert events[-1] == Close(FLOW, reset=False)


def test_reordered_duplicated_overlapping_segments_give_each_byte_once() -> None:
    rng = random.Random(7)
    body = rng.randbytes(200_000)
    isn = 0xFFFFF000  # wraps the sequence space in the middle of the stream
    segs = segments(isn, body, 1448)
    # Retransmissions re-cut the stream: overlapping pieces at odd offsets and sizes.
    for _ in range(300):
        start = rng.randrange(len(body))
        segs.append(tcp(isn + 1 + start, ACK, body[start : start + rng.randint(1, 5000)]))
    segs += rng.sample(segs, 50)  # exact duplicates
    rng.shuffle(segs)
    events, data = run([tcp(isn, SYN), *segs, tcp(isn + 1 + len(body), FIN | ACK)])
    assert data == body
    assert events[-1] == Close(FLOW, reset=False)


def test_fin_before_missing_data_waits_for_it() -> None:
    body = b"a" * 3000
    events, data = run([tcp(0, SYN), tcp(1, ACK, body[:1000]), tcp(2001, FIN | ACK, body[2000:]),
                        tcp(1001, ACK, body[1000:2000])])
    assert data == body
    assert events[-1] == Close(FLOW, reset=False)


def test_midstream_join_is_skipped_until_a_new_syn() -> None:
    counters: Counters = Counters()
    r = Reassembler(counters)
    events, data = run([tcp(5000, ACK, b"x" * 100), tcp(5100, ACK, b"y" * 100), tcp(5200, FIN | ACK)], r)
    assert events == [] and data == b""
    assert counters["mirror_joined_midstream"] == 1
    events, data = run([tcp(9000, SYN), tcp(9001, ACK, b"hello")], r)
    assert events[0] == Open(FLOW) and data == b"hello"


def test_rst_resets_and_late_copies_stay_quiet() -> None:
    r = Reassembler(Counters())
    events, _ = run([tcp(0, SYN), tcp(1, ACK, b"abc"), tcp(4, RST)], r)
    assert events[-1] == Close(FLOW, reset=True)
    events, _ = run([tcp(1, ACK, b"abc")], r)
    assert events == []


def test_retransmitted_syn_and_data_in_syn() -> None:
    events, data = run([tcp(10, SYN, b"early"), tcp(10, SYN, b"early"), tcp(16, ACK, b"late")])
    assert [e for e in events if isinstance(e, Open)] == [Open(FLOW)]
    assert data == b"earlylate"


def test_hole_never_filled_gives_up_after_timeout() -> None:
    counters: Counters = Counters()
    r = Reassembler(counters)
    run([tcp(0, SYN), tcp(1, ACK, b"a" * 10), tcp(100, ACK, b"b" * 10)], r)
    assert r.expire(reassembly.GAP_TIMEOUT / 2) == []
    assert r.expire(reassembly.GAP_TIMEOUT + 1) == [Close(FLOW, reset=True)]
    assert counters["mirror_gap_aborts"] == 1 and r.held == 0


def test_out_of_order_memory_is_bounded() -> None:
    counters: Counters = Counters()
    r = Reassembler(counters)
    chunk = b"z" * 65000
    packets = [tcp(0, SYN)] + [tcp(1_000_000 + i * len(chunk), ACK, chunk)
                               for i in range(reassembly.MAX_HELD // len(chunk) + 2)]
    events, data = run(packets, r)
    assert Close(FLOW, reset=True) in events and data == b""
    assert counters["mirror_overflow_aborts"] == 1 and r.held == 0


def test_udp_datagram() -> None:
    pkt = _ip(17, struct.pack("!HHHH", 5000, 53, 8 + 3, 0) + b"dns")
    events, _ = run([pkt])
    assert events == [Datagram(Flow(CLIENT, 5000, POD, 53), b"dns")]


def test_malformed_packets_are_counted() -> None:
    counters: Counters = Counters()
    r = Reassembler(counters)
    assert r.feed(b"\x45" + bytes(5), 0) == []
    assert r.feed(_ip(6, b"\x00" * 10), 0) == []
    assert counters["mirror_dropped_malformed"] == 2


CLIENT6, POD6 = "fd00:198:18::30", "fd00:198:18::10"


def _ip6(next_header: int, l4: bytes, padding: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), next_header, 64, socket.inet_pton(socket.AF_INET6, CLIENT6),
                       socket.inet_pton(socket.AF_INET6, POD6)) + l4 + padding


def tcp6(seq: int, flags: int, payload: bytes = b"", padding: bytes = b"") -> bytes:
    return _ip6(6, struct.pack("!HHIIBBHHH", 40000, 80, seq % (1 << 32), 0, 5 << 4, flags, 65535, 0, 0) + payload,
                padding)


def test_ipv6_stream_in_any_order_next_to_ipv4() -> None:
    rng = random.Random(11)
    body = rng.randbytes(50_000)
    segs = [tcp6(1 + i, ACK | PSH, body[i : i + 1428]) for i in range(0, len(body), 1428)]
    segs += rng.sample(segs, 10)
    rng.shuffle(segs)
    r = Reassembler(Counters())
    events, _ = run([tcp6(0, SYN), tcp(500, SYN), *segs, tcp(501, ACK, b"v4"),
                        tcp6(1 + len(body), FIN | ACK, padding=b"\0" * 6)], r)  # a short frame's padding
    flow6 = Flow(CLIENT6, 40000, POD6, 80)
    for flow, want in ((flow6, body), (FLOW, b"v4")):
        assert b"".join(e.data for e in events if isinstance(e, Data) and e.flow == flow) == want
    assert Open(flow6) in events and events[-1] == Close(flow6, reset=False)


def test_ipv6_udp_and_malformed() -> None:
    events, _ = run([_ip6(17, struct.pack("!HHHH", 5000, 53, 8 + 3, 0) + b"dns")])
    assert events == [Datagram(Flow(CLIENT6, 5000, POD6, 53), b"dns")]
    counters: Counters = Counters()
    r = Reassembler(counters)
    assert r.feed(b"\x60" + bytes(30), 0) == []  # shorter than the fixed header
    assert r.feed(_ip6(60, bytes(8) + tcp6(0, SYN)[40:]), 0) == []  # an extension header first
    assert counters["mirror_dropped_malformed"] == 2
