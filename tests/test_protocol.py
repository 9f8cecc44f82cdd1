"""The wire format and the packet checks, byte by byte: no root, no namespaces."""
from __future__ import annotations

import ipaddress
import struct

import dpkt
import pytest

from mirrord_tun import protocol
from mirrord_tun.protocol import MAX_BODY, AgentMsg, ClientMsg, FrameReader, Malformed
from mirrord_tun.pump import destination_is, ipv4_only, source_is

VNET = bytes(10)  # the plain virtio-net header every tunnel packet starts with


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    return [f for chunk in chunks for f in reader.feed(chunk)]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def ipv4(src: str, dst: str) -> bytes:
    icmp = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b"x"))
    ip = dpkt.ip.IP(src=ipaddress.IPv4Address(src).packed, dst=ipaddress.IPv4Address(dst).packed,
                    p=dpkt.ip.IP_PROTO_ICMP, data=icmp)
    return VNET + bytes(ip)


# --- framing

def test_frame_layout() -> None:
    assert protocol.frame(0x42, b"abc") == b"\x00\x00\x00\x03\x42abc"


def test_reader_one_byte_at_a_time() -> None:
    stream = protocol.frame(ClientMsg.HELLO, b'{"version":1}') + protocol.frame(ClientMsg.PACKETS, b"") \
        + protocol.frame(AgentMsg.STATS, b"{}")
    frames = feed_all(FrameReader(), chunked(stream, 1))
    assert frames == [(ClientMsg.HELLO, b'{"version":1}'), (ClientMsg.PACKETS, b""), (AgentMsg.STATS, b"{}")]


def test_reader_many_frames_in_one_chunk_and_a_split_tail() -> None:
    frames = [(ClientMsg.PACKETS, bytes([i]) * (i * 100)) for i in range(1, 20)]
    stream = b"".join(protocol.frame(k, b) for k, b in frames)
    reader = FrameReader()
    first = list(reader.feed(stream[:-7]))
    assert first == frames[:-1]  # the last one is incomplete and stays buffered
    assert list(reader.feed(stream[-7:])) == frames[-1:]


def test_reader_frame_of_exactly_max_body_is_kept() -> None:
    body = b"m" * MAX_BODY
    reader = FrameReader()
    assert feed_all(reader, chunked(protocol.frame(ClientMsg.PACKETS, body), 65536)) == [(ClientMsg.PACKETS, body)]
    assert reader.oversized == 0


@pytest.mark.parametrize("chunk", [1, 3, 4096, 65536, 3 << 20])
def test_reader_skips_oversized_frame_across_chunks(chunk: int) -> None:
    """A 2 MiB frame is counted and skipped, however it is cut, and what follows parses."""
    big = protocol.frame(ClientMsg.PACKETS, b"\xff" * (2 << 20))
    after = protocol.frame(ClientMsg.STATS, b"{}")
    stream = protocol.frame(ClientMsg.HELLO, b"{}") + big + after + big + after
    if chunk == 1:  # byte by byte through 4 MiB is slow in Python; cut only around the headers
        cuts = sorted({0, 1, 2, 3, 4, 5, 6, len(stream) - len(after) - 3, len(stream) - 2, len(stream)})
        chunks = [stream[a:b] for a, b in zip(cuts, cuts[1:])]
    else:
        chunks = chunked(stream, chunk)
    reader = FrameReader()
    frames = feed_all(reader, chunks)
    assert frames == [(ClientMsg.HELLO, b"{}"), (ClientMsg.STATS, b"{}"), (ClientMsg.STATS, b"{}")]
    assert reader.oversized == 2


def test_reader_never_buffers_an_oversized_body() -> None:
    reader = FrameReader()
    header = struct.pack("!IB", MAX_BODY + 1, ClientMsg.PACKETS)
    assert list(reader.feed(header)) == []
    for _ in range(4):
        assert list(reader.feed(b"\x00" * (MAX_BODY // 4))) == []
        assert len(reader._buf) == 0  # skipping, not collecting
    assert list(reader.feed(b"\x00" + protocol.frame(ClientMsg.STATS, b"{}"))) == [(ClientMsg.STATS, b"{}")]
    assert reader.oversized == 1


# --- packet batches

def test_pack_unpack_round_trip() -> None:
    packets = [b"a", b"bb" * 1000, VNET + b"\x45" + b"\x00" * 60]
    assert protocol.unpack_packets(protocol.pack_packets(packets)) == packets
    assert protocol.unpack_packets(b"") == []


@pytest.mark.parametrize("body, why", [
    (b"\x00\x00", "a length cut short"),
    (b"\x00\x00\x00\x05abc", "a packet cut short"),
    (b"\x00\x00\x00\x00", "a zero length"),
    (protocol.pack_packets([b"good"]) + b"\x00\x00\x01\x00", "good packet, then a length past the end"),
    (b"\xff\xff\xff\xff" + b"x" * 16, "a length of 4 GiB"),
])
def test_unpack_packets_rejects_truncated_batches(body: bytes, why: str) -> None:
    with pytest.raises(Malformed):
        protocol.unpack_packets(body)


# --- control messages

@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b""])
def test_parse_control_rejects_non_objects(body: bytes) -> None:
    with pytest.raises(Malformed):
        protocol.parse_control(body)


def test_control_round_trip() -> None:
    data = protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION})
    [(kind, body)] = list(FrameReader().feed(data))
    assert kind == ClientMsg.HELLO and protocol.parse_control(body) == {"version": protocol.VERSION}


def test_welcome_round_trip_and_rejects_missing_fields() -> None:
    w = protocol.Welcome(1, "abcd", "100.64.0.2", "100.64.0.1", 1500, ["198.18.0.10"], "nameserver 198.18.0.53\n")
    assert protocol.Welcome.from_json(w.to_json()).to_json() == w.to_json()
    broken = w.to_json()
    del broken["client_addr"]
    with pytest.raises(Malformed):
        protocol.Welcome.from_json(broken)
    with pytest.raises(Malformed):
        protocol.Welcome.from_json({**w.to_json(), "mtu": "many"})


def test_kind_names_for_logs() -> None:
    assert protocol.kind_name(ClientMsg.HELLO) == "HELLO"
    assert protocol.kind_name(AgentMsg.WELCOME) == "WELCOME"
    assert protocol.kind_name(0x42) == "0x42"


def test_kinds_are_typed_by_direction() -> None:
    # Client kinds have the high bit clear, agent kinds set: a frame can never be read as the other side's.
    assert all(k < 0x80 for k in ClientMsg) and all(k >= 0x80 for k in AgentMsg)


# --- the per-packet checks both ends use

def test_source_check_is_anti_spoofing() -> None:
    check = source_is("100.64.0.2")
    assert check(ipv4("100.64.0.2", "198.18.0.20")) is None
    assert check(ipv4("198.18.0.10", "198.18.0.20")) == "dropped_spoofed"
    assert check(ipv4("100.64.0.6", "198.18.0.20")) == "dropped_spoofed"


def test_destination_check() -> None:
    check = destination_is("100.64.0.2")
    assert check(ipv4("198.18.0.20", "100.64.0.2")) is None
    assert check(ipv4("198.18.0.20", "100.64.0.3")) == "dropped_misaddressed"


def test_ipv6_and_runts_are_dropped_by_name() -> None:
    ip6 = dpkt.ip6.IP6(src=b"\xfd" + b"\x00" * 14 + b"\x01", dst=b"\xfd" + b"\x00" * 14 + b"\x02", nxt=59, hlim=64)
    assert ipv4_only(VNET + bytes(ip6)) == "dropped_ipv6"
    assert source_is("100.64.0.2")(VNET + bytes(ip6)) == "dropped_ipv6"
    assert ipv4_only(VNET + b"\x45\x00") == "dropped_malformed"
    assert ipv4_only(VNET + b"\x55" + b"\x00" * 30) == "dropped_malformed"  # IP version 5
