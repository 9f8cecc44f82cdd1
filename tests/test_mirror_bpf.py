"""The capture filter, run by the real kernel without root.

An AF_UNIX datagram socket takes the same classic BPF, with the datagram at
offset 0 just like the IPv4 header on the agent's SOCK_DGRAM packet socket, so
crafted packets show what the filter lets through. (The TUN exclusion loads the
ifindex, which a unix socket's packets lack; it is left empty here.)
"""
from __future__ import annotations

import socket
import struct
from typing import Iterator

import pytest

from mirrord_tun.agent import bpf

POD, OTHER, CLIENT = "198.18.0.10", "198.18.0.11", "198.18.0.30"
POD6, POD6B, OTHER6, CLIENT6 = "fd00:198:18::10", "fd00:198:18::12", "fd00:198:18::11", "fd00:198:18::30"
ACK, PSH, SYN, FIN, RST = 0x10, 0x08, 0x02, 0x01, 0x04


def ipv4(proto: int, l4: bytes, dst: str = POD, frag: int = 0x4000) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0,
                       socket.inet_aton(CLIENT), socket.inet_aton(dst)) + l4


def tcp(dport: int, flags: int = ACK | PSH, payload: bytes = b"data", **ip: object) -> bytes:
    return ipv4(6, struct.pack("!HHIIBBHHH", 40000, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload, **ip)  # type: ignore[arg-type]


def udp(dport: int, payload: bytes = b"q") -> bytes:
    return ipv4(17, struct.pack("!HHHH", 5000, dport, 8 + len(payload), 0) + payload)


def ipv6(next_header: int, payload: bytes, dst: str = POD6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, CLIENT6), socket.inet_pton(socket.AF_INET6, dst)) + payload


def tcp6(dport: int, flags: int = ACK | PSH, payload: bytes = b"data", dst: str = POD6) -> bytes:
    return ipv6(6, struct.pack("!HHIIBBHHH", 40000, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload, dst)


def udp6(dport: int, payload: bytes = b"q") -> bytes:
    return ipv6(17, struct.pack("!HHHH", 5000, dport, 8 + len(payload), 0) + payload)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def passes(pair: tuple[socket.socket, socket.socket], prog: list[bpf.Insn], pkt: bytes) -> bool:
    return received(pair, prog, pkt) == pkt


def received(pair: tuple[socket.socket, socket.socket], prog: list[bpf.Insn], pkt: bytes) -> bytes | None:
    """What the filter lets through of `pkt` (perhaps cut short), None if nothing."""
    a, b = pair
    bpf.attach(b, prog)
    a.send(pkt)
    try:
        return b.recv(65536)
    except BlockingIOError:
        return None


def test_subscribed_ports_on_pod_addresses_only(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program([POD, "198.18.0.12"], {80, 53}, set())
    assert passes(pair, prog, tcp(80))
    assert passes(pair, prog, tcp(80, dst="198.18.0.12"))
    assert passes(pair, prog, udp(53))
    assert not passes(pair, prog, tcp(81))
    assert not passes(pair, prog, udp(54))
    assert not passes(pair, prog, tcp(80, dst=OTHER))
    assert not passes(pair, prog, ipv4(1, b"\x08\x00" + bytes(6)))  # ICMP


def test_tcp_control_segments_pass_and_pure_acks_do_not(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program([POD], {80}, set())
    for flags in (SYN, FIN | ACK, RST, RST | ACK):
        assert passes(pair, prog, tcp(80, flags, b"")), flags
    assert not passes(pair, prog, tcp(80, ACK, b""))
    assert passes(pair, prog, tcp(80, ACK, b"x"))


def test_fragments_and_empty_subscriptions_are_rejected(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program([POD], {80}, set())
    assert not passes(pair, prog, tcp(80, frag=0x2000))  # more fragments follow
    assert not passes(pair, prog, tcp(80, frag=0x0010))  # a later fragment
    assert not passes(pair, bpf.program([POD], set(), set()), tcp(80))


def test_many_ports_fit() -> None:
    ports = set(range(1000, 1000 + bpf.MAX_PORTS))
    prog = bpf.program([POD], ports, {7, 9})
    assert len(prog) < 4096
    with pytest.raises(ValueError):
        bpf.program([POD], ports | {1}, set())


def test_large_port_set_in_the_kernel(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program([POD], set(range(2000, 2000 + bpf.MAX_PORTS)), set())
    assert passes(pair, prog, tcp(2000 + bpf.MAX_PORTS - 1))
    assert not passes(pair, prog, tcp(2000 + bpf.MAX_PORTS))


DUAL = [POD, POD6, POD6B]


def test_ipv6_subscribed_ports_on_pod_addresses_only(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program(DUAL, {80, 53}, set())
    assert passes(pair, prog, tcp6(80))
    assert passes(pair, prog, tcp6(80, dst=POD6B))
    assert passes(pair, prog, udp6(53))
    assert not passes(pair, prog, tcp6(81))
    assert not passes(pair, prog, tcp6(80, dst=OTHER6))
    # Differs from a pod address in one word only, each word in turn.
    for i in range(4):
        other = bytearray(socket.inet_pton(socket.AF_INET6, POD6))
        other[4 * i] ^= 1
        assert not passes(pair, prog, tcp6(80, dst=socket.inet_ntop(socket.AF_INET6, bytes(other)))), i
    assert not passes(pair, prog, ipv6(58, b"\x80\x00" + bytes(6)))  # ICMPv6 echo
    assert passes(pair, prog, tcp(80))  # IPv4 still, in the same program


def test_ipv6_tcp_control_segments_pass_and_pure_acks_do_not(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program(DUAL, {80}, set())
    for flags in (SYN, FIN | ACK, RST, RST | ACK):
        assert passes(pair, prog, tcp6(80, flags, b"")), flags
    assert not passes(pair, prog, tcp6(80, ACK, b""))
    assert passes(pair, prog, tcp6(80, ACK, b"x"))


def test_ipv6_extension_headers_pass_cut_short_to_be_counted(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program(DUAL, {80}, set())
    dstopts = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next: TCP; a PadN option filling 8 bytes
    pkt = ipv6(60, dstopts + tcp6(80)[40:])
    assert received(pair, prog, pkt) == pkt[:bpf.EXT_SNAPLEN]
    assert received(pair, prog, ipv6(60, dstopts + tcp6(80)[40:], dst=OTHER6)) is None


def test_address_families_only_where_the_pod_has_them(pair: tuple[socket.socket, socket.socket]) -> None:
    assert not passes(pair, bpf.program([POD], {80}, set()), tcp6(80))
    assert not passes(pair, bpf.program([POD6], {80}, set()), tcp(80))
    assert passes(pair, bpf.program([POD6], {80}, set()), tcp6(80))


def test_large_port_set_with_both_families_in_the_kernel(pair: tuple[socket.socket, socket.socket]) -> None:
    prog = bpf.program(DUAL, set(range(2000, 2000 + bpf.MAX_PORTS)), set())
    assert passes(pair, prog, tcp6(2000 + bpf.MAX_PORTS - 1))
    assert passes(pair, prog, tcp(2000 + bpf.MAX_PORTS - 1))
    assert not passes(pair, prog, tcp6(2000 + bpf.MAX_PORTS))
