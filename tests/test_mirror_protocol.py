"""The mirror's wire additions (protocol version 2): pure, no root."""
from __future__ import annotations

import pytest

from mirrord_tun import protocol
from mirrord_tun.protocol import AgentMsg, ClientMsg


def test_subscribe_round_trip() -> None:
    frames = list(protocol.FrameReader().feed(protocol.subscribe({443, 80})))
    assert frames == [(ClientMsg.SUBSCRIBE, b'{"ports":[80,443]}')]
    assert protocol.parse_subscribe(frames[0][1]) == {80, 443}


@pytest.mark.parametrize("body", [b'{"ports":"80"}', b'{"ports":[0]}', b'{"ports":[65536]}', b'{"ports":[true]}',
                                  b'{"ports":[1.5]}', b"{}", b"[80]", b"\xff"])
def test_bad_subscribe_is_malformed(body: bytes) -> None:
    with pytest.raises(protocol.Malformed):
        protocol.parse_subscribe(body)


def test_too_many_ports_is_malformed() -> None:
    body = protocol.subscribe(set(range(1, protocol.MAX_PORTS + 2)))[5:]
    with pytest.raises(protocol.Malformed):
        protocol.parse_subscribe(body)


def test_mirror_frame_is_a_packet_batch() -> None:
    packets = [b"\x45" + bytes(39), b"\x45" + bytes(1499)]
    data = protocol.frame(AgentMsg.MIRROR, protocol.pack_packets(packets))
    [(kind, body)] = protocol.FrameReader().feed(data)
    assert kind == AgentMsg.MIRROR and protocol.unpack_packets(body) == packets
    assert protocol.kind_name(kind) == "MIRROR"
