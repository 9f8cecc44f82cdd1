"""Property-based fuzzing of everything that parses what the other end sent: no root needed.

Whatever the bytes, a parser returns or raises `Malformed`, and a per-packet check
returns None or the name of a drop counter; nothing else may escape (an exception
there would reset a session or print a traceback). Bounded so the file runs in seconds.
"""
from __future__ import annotations

import ipaddress
import json
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord_tun import protocol
from mirrord_tun.mirror import admit
from mirrord_tun.mirror.reassembly import Close, Data, Datagram, Open, Reassembler
from mirrord_tun.protocol import FrameReader, Malformed
from mirrord_tun.pump import MIN_GSO_SIZE, vnet_check

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
addresses = st.sampled_from(["100.64.0.1", "100.64.0.2", "198.18.0.10", "127.0.0.1", "0.0.0.0", "224.0.0.1",
                             "169.254.1.1", "255.255.255.255", "10.0.0.1", "1.2.3", "::1", ""]) | st.text(max_size=16)


def parse_or_malformed(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except Malformed:
        return None


# --- framing

@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), max_size=40))
def test_frame_reader_takes_any_bytes_cut_anywhere(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader()
    pos = 0
    for size in cuts + [len(data)]:
        for kind, body in reader.feed(data[pos : pos + size]):
            assert 0 <= kind < 256 and len(body) <= protocol.MAX_BODY
        pos += size


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=10),
       st.lists(st.integers(1, 500), min_size=1, max_size=20))
def test_frame_reader_returns_exactly_the_frames_sent(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(protocol.frame(k, b) for k, b in frames)
    reader = FrameReader()
    got, pos, i = [], 0, 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        got += list(reader.feed(stream[pos : pos + size]))
        pos, i = pos + size, i + 1
    assert got == frames


@FUZZ
@given(st.binary(max_size=1024))
def test_unpack_packets_returns_nonempty_packets_or_malformed(body: bytes) -> None:
    packets = parse_or_malformed(protocol.unpack_packets, body)
    if packets is not None:
        assert all(packets) and protocol.pack_packets(packets) == body


# --- control bodies

@FUZZ
@given(st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_control_and_subscribe_take_any_body(body: bytes) -> None:
    value = parse_or_malformed(protocol.parse_control, body)
    assert value is None or isinstance(value, dict)
    ports = parse_or_malformed(protocol.parse_subscribe, body)
    assert ports is None or (len(ports) <= protocol.MAX_PORTS and all(type(p) is int and 0 < p < 65536 for p in ports))


@FEW
@given(st.integers(1, 200_000), st.sampled_from([b"[", b"{\"a\":"]))
def test_deep_nesting_is_malformed_not_recursion(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    body = b'{"ports":' + opener * depth + b"1" + closer * depth + b"}"
    parse_or_malformed(protocol.parse_subscribe, body)  # RecursionError would escape here


@FUZZ
@given(st.fixed_dictionaries({}, optional={
    "version": st.integers(-2, 5) | json_values, "session": st.sampled_from(["abcd1234", "", "ABC", "\x1b[2J"]) | json_values,
    "client_addr": addresses | json_values, "agent_addr": addresses | json_values,
    "mtu": st.integers(0, 70_000) | json_values, "pod_addrs": st.lists(addresses, max_size=40) | json_values,
    "resolv_conf": st.text(max_size=100) | json_values,
}))
def test_welcome_from_json_checks_every_field(d: dict[str, object]) -> None:
    w = parse_or_malformed(protocol.Welcome.from_json, d)
    if w is None:
        return
    assert protocol.MIN_VERSION <= w.version <= protocol.VERSION
    assert protocol.MIN_MTU <= w.mtu <= protocol.MAX_MTU
    for a in [w.client_addr, w.agent_addr, *w.pod_addrs]:
        addr = ipaddress.IPv4Address(a)
        assert not (addr.is_loopback or addr.is_multicast or addr.is_link_local or addr.is_unspecified
                    or addr.is_reserved)
    assert w.client_addr != w.agent_addr and not {w.client_addr, w.agent_addr} & set(w.pod_addrs)


@FEW
@given(st.binary(max_size=300))
def test_welcome_from_any_control_body(body: bytes) -> None:
    d = parse_or_malformed(protocol.parse_control, body)
    if d is not None:
        parse_or_malformed(protocol.Welcome.from_json, d)


# --- virtio-net headers from the peer

small = st.integers(0, 80) | st.integers(0, 65535)
vnet_headers = st.builds(struct.pack, st.just("=BBHHHH"), st.sampled_from([0, 1, 2, 3, 4]) | st.integers(0, 255),
                         st.sampled_from([0, 1, 3, 4, 5, 0x81, 0xFF]), small, small, small, small)
ip_heads = st.builds(lambda vihl, proto, rest: bytes([vihl]) + rest[:8] + bytes([proto]) + rest[8:],
                     st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40]), st.sampled_from([6, 17, 1, 0]),
                     st.binary(min_size=18, max_size=200))


@FUZZ
@given(st.binary(max_size=120) | st.builds(bytes.__add__, vnet_headers, ip_heads))
def test_vnet_check_returns_a_reason_or_a_safe_header(pkt: bytes) -> None:
    reason = vnet_check(pkt)
    assert reason in (None, "dropped_malformed", "dropped_bad_vnet")
    if reason is None:
        flags, gso, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("=BBHHHH", pkt)
        size = len(pkt) - 10
        assert not flags & ~3 and hdr_len <= size
        assert not flags & 1 or csum_start + csum_offset + 2 <= size
        if gso:
            assert gso_size >= MIN_GSO_SIZE and csum_offset == 16
            if gso & 0x7F == 1:  # TCP over IPv4
                assert pkt[10] >> 4 == 4 and pkt[19] == 6 and csum_start == (pkt[10] & 15) * 4
            else:  # TCP over IPv6 without extension headers
                assert gso & 0x7F == 4 and pkt[10] >> 4 == 6 and pkt[16] == 6 and csum_start == 40


# --- the inbound mirror: the admission check and the reassembler

POD = ipaddress.IPv4Address("198.18.0.10").packed
OWN = frozenset({POD, ipaddress.IPv4Address("100.64.0.2").packed, ipaddress.IPv4Address("100.64.0.1").packed})
SOURCES = [bytes([198, 18, 0, 30]), bytes([127, 0, 0, 1]), bytes([224, 0, 0, 1]), bytes([100, 64, 0, 2]), POD,
           bytes([169, 254, 0, 1]), bytes(4), bytes([255] * 4), bytes([10, 1, 2, 3])]


def ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, total: int | None = None, frag: int = 0) -> bytes:
    length = 20 + len(l4) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 1, frag, 64, proto, 0, src, dst) + l4


def tcp(sport: int, dport: int, seq: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 0x50, flags, 65535, 0, 0) + payload


mirror_packets = st.builds(
    lambda src, dst, proto, sport, dport, seq, flags, payload, total, frag: ipv4(
        src, dst, proto, tcp(sport, dport, seq, flags, payload) if proto == 6 else
        struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, total, frag),
    st.sampled_from([SOURCES[0], *SOURCES]), st.sampled_from([POD, POD, bytes([127, 0, 0, 1]), bytes([198, 18, 0, 11])]),
    st.sampled_from([6, 17, 6, 17, 1]), st.sampled_from([40000, 40001, 0]), st.sampled_from([80, 80, 81, 7001]),
    st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=64),
    st.sampled_from([None, None, None, 0, 1, 65535]), st.sampled_from([0, 0, 0, 0x4000, 0x2000, 1]))


@FUZZ
@given(st.binary(max_size=100) | mirror_packets)
def test_mirror_admits_only_subscribed_copies_to_the_pod_from_real_clients(pkt: bytes) -> None:
    reason = admit(pkt, frozenset({POD}), OWN, lambda port: port == 80)
    assert reason is None or reason.startswith("dropped_mirror_")
    if reason is None:
        ihl = (pkt[0] & 15) * 4
        assert pkt[9] in (6, 17) and pkt[16:20] == POD and pkt[ihl + 2 : ihl + 4] == b"\x00\x50"
        assert pkt[12:16] not in OWN and not protocol.not_unicast(pkt[12:16])


@FUZZ
@given(st.lists(st.binary(max_size=80) | mirror_packets, max_size=30))
def test_reassembler_takes_any_packets(packets: list[bytes]) -> None:
    counters: Counter[str] = Counter()
    r = Reassembler(counters)
    for i, pkt in enumerate(packets):
        for ev in r.feed(pkt, float(i)):
            assert isinstance(ev, (Open, Data, Close, Datagram))
        assert r.held >= 0
    r.expire(1e6)
    assert not r.streams and r.held == 0


@FUZZ
@given(st.binary(min_size=1, max_size=3000), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 700)), max_size=25),
       st.randoms(use_true_random=False), st.booleans())
def test_reassembler_rebuilds_the_stream_from_adversarial_segments(
        data: bytes, isn: int, cuts: list[tuple[int, int]], rnd, complete: bool) -> None:  # type: ignore[no-untyped-def]
    """Overlapping, duplicated, reordered segments across a sequence wrap: every byte emitted once, in order."""
    src, flow = SOURCES[0], (40000, 80)
    segments = [(off, data[off : off + n]) for off, n in cuts if off < len(data)]
    if complete:  # the whole stream once more, in pieces, so nothing is left missing
        segments += [(off, data[off : off + 500]) for off in range(0, len(data), 500)]
    rnd.shuffle(segments)
    counters: Counter[str] = Counter()
    r = Reassembler(counters)
    events = r.feed(ipv4(src, POD, 6, tcp(*flow, isn, 0x02, b"")), 0.0)
    for off, seg in segments:
        fin = 0x01 if off + len(seg) == len(data) else 0
        events += r.feed(ipv4(src, POD, 6, tcp(*flow, (isn + 1 + off) % 2**32, 0x10 | fin, seg)), 1.0)
    got = b"".join(ev.data for ev in events if isinstance(ev, Data))
    assert data.startswith(got)
    if complete:
        assert got == data and isinstance(events[-1], Close) and not events[-1].reset
