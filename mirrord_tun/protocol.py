"""The wire between `mirrord-ns run` and the agent: one SSH subsystem channel.

Every message is a frame: a 4-byte big-endian body length, a 1-byte kind, the
body. Kinds are typed by direction (`ClientMsg` flows client→agent, `AgentMsg`
agent→client). Control bodies are JSON; `PACKETS` bodies are a batch of
length-prefixed packets, each a virtio-net header plus an IPv4 packet (see
netns/tun.py), so one SSH write carries every packet that was ready at once.

The client opens with HELLO carrying its protocol version; the agent answers
WELCOME with min(client, agent). New kinds are only ever appended, and used
only when the negotiated version has them: version 2 adds the inbound mirror
(SUBSCRIBE, MIRROR; see "Inbound mirror" in README.md).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import struct
from typing import Any, Iterator

VERSION = 2
MIN_VERSION = 1
MIRROR_VERSION = 2  # first version with SUBSCRIBE and MIRROR
SUBSYSTEM = "mirrord-ns"
MAX_BODY = 1 << 20  # bigger frames are skipped whole and counted, never buffered

_HEADER = struct.Struct("!IB")
_LEN = struct.Struct("!I")


class ClientMsg(enum.IntEnum):
    HELLO = 0x01  # {"version": int}
    PACKETS = 0x02  # packet batch from the local TUN
    STATS = 0x03  # {} -> agent answers AgentMsg.STATS
    SUBSCRIBE = 0x04  # {"ports": [int]}: the pod ports to mirror, replacing the previous set (v2)


class AgentMsg(enum.IntEnum):
    WELCOME = 0x81  # Welcome.to_json()
    PACKETS = 0x82  # packet batch for the local TUN
    STATS = 0x83  # {counter: int}
    MIRROR = 0x84  # batch like PACKETS, but bare IPv4 packets copied from the pod's inbound traffic (v2)
    ERROR = 0x8F  # {"error": str}; the agent closes the channel after it


def kind_name(kind: int) -> str:
    for enum_type in (ClientMsg, AgentMsg):
        try:
            return enum_type(kind).name
        except ValueError:
            pass
    return f"0x{kind:02x}"


class Malformed(ValueError):
    """A frame whose body does not parse; the caller drops and counts it."""


def frame(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body), kind) + body


def control(kind: int, payload: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(payload, separators=(",", ":")).encode())


def parse_control(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"bad control body: {e}") from None
    if not isinstance(value, dict):
        raise Malformed("control body is not an object")
    return value


def _packet_parts(packets: list[bytes]) -> list[bytes]:
    parts: list[bytes] = []
    for p in packets:
        parts += (_LEN.pack(len(p)), p)
    return parts


def pack_packets(packets: list[bytes]) -> bytes:
    """A PACKETS (or MIRROR) body."""
    return b"".join(_packet_parts(packets))


def frame_packets(kind: int, packets: list[bytes]) -> bytes:
    """frame(kind, pack_packets(packets)) in one copy instead of two (the hot path)."""
    parts = _packet_parts(packets)
    return b"".join([_HEADER.pack(sum(map(len, parts)), kind), *parts])


def unpack_packets(body: bytes) -> list[bytes]:
    """Split a PACKETS body; a truncated batch is Malformed as a whole."""
    out: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise Malformed("truncated packet length")
        (n,) = _LEN.unpack_from(body, pos)
        pos += 4
        if n == 0 or pos + n > end:
            raise Malformed("packet length out of range")
        out.append(body[pos : pos + n])
        pos += n
    return out


MAX_PORTS = 1024  # per SUBSCRIBE; the agent's capture filter holds no more


def subscribe(ports: set[int]) -> bytes:
    return control(ClientMsg.SUBSCRIBE, {"ports": sorted(ports)})


def parse_subscribe(body: bytes) -> set[int]:
    ports = parse_control(body).get("ports")
    if not isinstance(ports, list) or len(ports) > MAX_PORTS:
        raise Malformed(f"SUBSCRIBE needs a list of at most {MAX_PORTS} ports")
    if not all(type(p) is int and 0 < p < 65536 for p in ports):  # bool is an int subclass
        raise Malformed("SUBSCRIBE ports must be integers 1-65535")
    return set(ports)


class FrameReader:
    """Turns a byte stream into frames, skipping oversized ones without buffering them."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self.oversized = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        buf = self._buf
        while len(buf) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(buf)
            if length > MAX_BODY:
                self.oversized += 1
                drop = min(len(buf), _HEADER.size + length)
                self._skip = _HEADER.size + length - drop
                del buf[:drop]
                continue
            end = _HEADER.size + length
            if len(buf) < end:
                break
            body = bytes(buf[_HEADER.size : end])
            del buf[:end]
            yield kind, body


@dataclasses.dataclass
class Welcome:
    """What the agent tells the client once its side of the tunnel exists."""

    version: int
    session: str
    client_addr: str
    agent_addr: str
    mtu: int
    pod_addrs: list[str]
    resolv_conf: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Welcome":
        try:
            return cls(int(d["version"]), str(d["session"]), str(d["client_addr"]),
                       str(d["agent_addr"]), int(d["mtu"]), [str(a) for a in d["pod_addrs"]],
                       str(d["resolv_conf"]))
        except (KeyError, TypeError, ValueError) as e:
            raise Malformed(f"bad WELCOME: {e!r}") from None
