"""The wire format and the packet checks, byte by byte: no root, no namespaces."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from typing import Any

import dpkt
import pytest

from mirrord_tun import protocol
from mirrord_tun.protocol import MAX_BODY, AgentMsg, ClientMsg, FrameReader, Malformed
from mirrord_tun.pump import destination_is, source_is, vnet_check

VNET = bytes(10)  # the plain virtio-net header every tunnel packet starts with
CLIENT6, POD6 = "fd6d:7264:6e73::6440:2", "fd00:198:18::10"


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

def test_whole_takes_exactly_one_packet_batch_and_leaves_the_rest_to_feed() -> None:
    batch = protocol.frame(ClientMsg.PACKETS, protocol.pack_packets([b"a" * 40, b"b" * 60]))
    reader = FrameReader()
    kind, body = reader.whole(memoryview(batch))
    assert (kind, type(body), bytes(body)) == (ClientMsg.PACKETS, memoryview, batch[protocol.FRAME_HEADER :])
    hello = protocol.control(ClientMsg.HELLO, {"version": 1})
    for data in (batch, batch + batch, batch[:-1], hello, b"", batch[:3]):
        assert reader.whole(memoryview(data) if data is not batch else data) is None  # bytes: feed copies
    # Half a frame buffered: the next message is no longer one whole frame on its own.
    assert feed_all(reader, [batch[:7]]) == []
    assert reader.whole(memoryview(batch)) is None
    assert feed_all(reader, [batch[7:]]) == [(ClientMsg.PACKETS, batch[protocol.FRAME_HEADER :])]
    assert reader.whole(memoryview(batch)) is not None


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


def welcome6(**changes: Any) -> dict[str, Any]:
    w = protocol.Welcome(4, "abcd", "100.64.0.2", "100.64.0.1", 1500, ["198.18.0.10"], "", "ab" * 32, 60.0,
                         CLIENT6, "fd6d:7264:6e73::6440:1", [POD6])
    return {**w.to_json(), **changes}


def test_welcome_with_ipv6_round_trips_and_without_is_ipv4_only() -> None:
    w = protocol.Welcome.from_json(welcome6())
    assert (w.client_addr6, w.pod_addrs6, w.client_addrs) == (CLIENT6, [POD6], ["100.64.0.2", CLIENT6])
    assert protocol.Welcome.from_json(w.to_json()) == w
    # What an older agent (or an IPv4-only pod) sends: no IPv6 fields at all.
    old = {k: v for k, v in welcome6().items() if not k.endswith("6")}
    w4 = protocol.Welcome.from_json(old)
    assert (w4.client_addr6, w4.agent_addr6, w4.pod_addrs6, w4.client_addrs) == ("", "", [], ["100.64.0.2"])
    assert w4.to_json() == old  # and says nothing of IPv6 to an older client either


@pytest.mark.parametrize("changes, message", [
    ({"client_addr6": "ff02::1"}, "client_addr6 ff02::1 is not a unicast"),
    ({"agent_addr6": "fe80::1"}, "agent_addr6 fe80::1 is not a unicast"),
    ({"client_addr6": "::1"}, "not a unicast"),
    ({"client_addr6": "::ffff:100.64.0.2"}, "not a unicast"),
    ({"client_addr6": "fd00::1; flush ruleset"}, "is not an IPv6 address"),
    ({"pod_addrs6": ["fd00::1%x }; flush ruleset"]}, "has a scope"),  # Python's parser takes any scope
    ({"client_addr6": "fd00::1%0"}, "has a scope"),
    ({"client_addr6": 6}, "client_addr6 is not an IPv6 address"),
    ({"client_addr6": "100.64.0.2"}, "not an IPv6 address"),
    ({"agent_addr6": ""}, "agent_addr6 '' is not an IPv6 address"),
    ({"agent_addr6": CLIENT6}, "client_addr6 and agent_addr6 are both"),
    ({"pod_addrs6": [CLIENT6]}, "a pod address is a tunnel address"),
    ({"pod_addrs6": ["ff02::2"]}, "pod address ff02::2 is not a unicast"),
    ({"pod_addrs6": POD6}, "pod_addrs6 must be a list"),
    ({"pod_addrs6": [POD6] * 33}, "33 pod_addrs6"),
    ({"mtu": 1000}, "mtu 1000 too small for IPv6"),
])
def test_hostile_ipv6_welcome_fields_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(Malformed, match=re.escape(message)):
        protocol.Welcome.from_json(welcome6(**changes))


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


def ipv6(src: str, dst: str, nxt: int = 59, payload: bytes = b"") -> bytes:
    ip6 = dpkt.ip6.IP6(src=ipaddress.IPv6Address(src).packed, dst=ipaddress.IPv6Address(dst).packed,
                       nxt=nxt, hlim=64, plen=len(payload), data=payload)
    return VNET + bytes(ip6)


def test_ipv6_and_runts_are_dropped_by_name() -> None:
    """An IPv4-only session's checks: IPv6 is counted as such, runts and other versions as malformed."""
    check = source_is("100.64.0.2")
    assert check(ipv6("fd00::1", "fd00::2")) == "dropped_ipv6"
    assert check(VNET + b"\x45\x00") == "dropped_malformed"
    assert check(VNET + b"\x55" + b"\x00" * 30) == "dropped_malformed"  # IP version 5


def test_dual_stack_checks_look_at_each_family() -> None:
    source, destination = source_is("100.64.0.2", CLIENT6), destination_is("100.64.0.2", CLIENT6)
    assert source(ipv6(CLIENT6, POD6)) is None
    assert source(ipv6(POD6, POD6)) == "dropped_spoofed"
    assert source(ipv4("100.64.0.2", "198.18.0.20")) is None
    assert source(ipv4("100.64.0.6", "198.18.0.20")) == "dropped_spoofed"
    assert destination(ipv6(POD6, CLIENT6)) is None
    assert destination(ipv6(POD6, "fd6d:7264:6e73::6440:3")) == "dropped_misaddressed"
    # Long enough for an IPv4 header, too short for an IPv6 one.
    assert source(VNET + b"\x60" + bytes(25)) == "dropped_malformed"


def vnet(flags: int, gso: int, gso_size: int, csum_start: int, csum_offset: int = 16) -> bytes:
    return struct.pack("=BBHHHH", flags, gso, 60, gso_size, csum_start, csum_offset)


def test_vnet_check_allows_tcp_over_ipv6_segmentation_only_as_the_kernel_makes_it() -> None:
    tcp = bytes(20) + b"x" * 3000
    good = vnet(1, 4, 1420, 40) + ipv6(CLIENT6, POD6, 6, tcp)[10:]
    assert vnet_check(good) is None
    assert vnet_check(vnet(1, 0x84, 1420, 40) + good[10:]) is None  # with ECN
    for bad in (vnet(1, 4, 1420, 48) + good[10:],  # an extension header's room: not from the kernel's TCP
                vnet(1, 4, 1420, 40) + ipv6(CLIENT6, POD6, 17, tcp)[10:],  # not TCP
                vnet(1, 4, 20, 40) + good[10:],  # a tiny segment size
                vnet(1, 1, 1420, 40) + good[10:],  # TCPv4 segmentation of an IPv6 packet
                vnet(1, 4, 1420, 20) + ipv4("100.64.0.2", "198.18.0.20")[10:] + tcp):  # and the reverse
        assert vnet_check(bad) == "dropped_bad_vnet", bad[:12]


def test_why_a_session_has_no_ipv6_travels_and_is_bounded() -> None:
    w = protocol.Welcome(1, "abcd", "100.64.0.2", "100.64.0.1", 1500, ["198.18.0.10"], "", ipv6_off="no knob")
    assert protocol.Welcome.from_json(w.to_json()).ipv6_off == "no knob"
    assert "ipv6_off" not in dataclasses.replace(w, ipv6_off="").to_json()
    for bad in (["x"], "x" * (protocol.MAX_REASON + 1)):
        with pytest.raises(protocol.Malformed):
            protocol.Welcome.from_json({**w.to_json(), "ipv6_off": bad})


# --------------------------------------------------------------------------- filtered steals
def test_a_filtered_steal_with_method_all_of_and_any_of_round_trips() -> None:
    f = protocol.FilteredSteal(80, 8080, "^x-user: me$", None, "GET", (("path", "^/api/"), ("method", "PUT")),
                               (("header", "^x-team: a$"),))
    request = protocol.StealRequest(filtered=(f,))
    assert protocol.parse_steal(protocol.steal(request)[5:]) == request
    assert f.extended() and not protocol.FilteredSteal(80, 8080, "x", None).extended()
    assert protocol.VERSION >= protocol.FILTER_VERSION


@pytest.mark.parametrize("bad", [
    {"port": 80, "local": 80},  # no filter at all
    {"port": 80, "local": 80, "method": "G T"},
    {"port": 80, "local": 80, "any_of": []},
    {"port": 80, "local": 80, "any_of": [{"cookie": "x"}]},
    {"port": 80, "local": 80, "all_of": [{"path": "x", "header": "y"}]},
    {"port": 80, "local": 80, "all_of": [{"path": None}]},
    {"port": 80, "local": 80, "any_of": [{"path": "("}]},
    {"port": 80, "local": 80, "any_of": [{"method": "GET"}] * (protocol.MAX_SINGLE_FILTERS + 1)},
])
def test_a_bad_filtered_steal_is_malformed(bad: dict) -> None:
    with pytest.raises(protocol.Malformed):
        protocol.FilteredSteal.from_json(bad)


def test_which_ports_a_filter_takes() -> None:
    from mirrord_tun.stealer import HttpFilterSpec, StealOptions

    served = {80: 80, 2525: 2525, 8080: 8080, 9000: 9000}
    default = StealOptions({9000: 9000}, http=HttpFilterSpec(header="x")).request(served, {})
    assert [f.port for f in default.filtered] == [80, 8080, 9000] and default.tcp == {}  # 2525 stays the pod's
    named = StealOptions({2525: 2525}, http=HttpFilterSpec(header="x", ports=(80,))).request(served, {})
    assert [f.port for f in named.filtered] == [80] and named.tcp == {2525: 2525}  # --port, not HTTP: whole
    whole = StealOptions({}).request(served, {})
    assert whole.tcp == served and not whole.filtered
