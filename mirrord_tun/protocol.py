"""The wire between `mirrord-ns run` and the agent: one SSH subsystem channel.

Every message is a frame: a 4-byte big-endian body length, a 1-byte kind, the
body. Kinds are typed by direction (`ClientMsg` flows client→agent, `AgentMsg`
agent→client). Control bodies are JSON; `PACKETS` bodies are a batch of
length-prefixed packets, each a virtio-net header plus an IPv4 or IPv6 packet
(see netns/tun.py), so one SSH write carries every packet that was ready at once.

The client opens with HELLO carrying its protocol version; the agent answers
WELCOME with min(client, agent). New kinds are only ever appended, and used
only when the negotiated version has them: version 2 adds the inbound mirror
(SUBSCRIBE, MIRROR; see docs/mirror.md), version 3 steal (STEAL,
STEAL_STATE), version 4 resume: WELCOME carries a per-session secret and the
agent's grace period, and a client whose connection dropped opens a new one
(with the same key) and sends RESUME instead of HELLO. Version 5: a filtered
steal may carry `method`, `all_of` and `any_of` (an older agent would ignore
them and steal more than asked, so the client sends them only from 5 on).

IPv6 needs no new version: an agent whose session carries IPv6 adds optional
fields to WELCOME (`client_addr6`, `agent_addr6`, `pod_addrs6`), which older
clients ignore; a WELCOME without them (an older agent, an IPv4-only pod) is an
IPv4-only session.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import re
import struct
from typing import Any, Callable, Iterator

VERSION = 5
MIN_VERSION = 1
MIRROR_VERSION = 2  # first version with SUBSCRIBE and MIRROR
STEAL_VERSION = 3  # first version with STEAL and STEAL_STATE
RESUME_VERSION = 4  # first version with RESUME, and a secret and resume_timeout in WELCOME
FILTER_VERSION = 5  # first version whose filtered steals have method, all_of and any_of
MAX_RESUME_TIMEOUT = 24 * 3600
SUBSYSTEM = "mirrord-ns"
MAX_BODY = 1 << 20  # bigger frames are skipped whole and counted, never buffered
MAX_CONTROL = 128 * 1024  # a JSON body; the largest real one is a WELCOME with a 64 KiB resolv.conf

_HEADER = struct.Struct("!IB")
_LEN = struct.Struct("!I")


class ClientMsg(enum.IntEnum):
    HELLO = 0x01  # {"version": int}
    PACKETS = 0x02  # packet batch from the local TUN
    STATS = 0x03  # {} -> agent answers AgentMsg.STATS
    SUBSCRIBE = 0x04  # {"ports": [int]}: the pod ports to mirror, replacing the previous set (v2)
    STEAL = 0x05  # StealRequest.to_json(): the pod ports to steal, replacing the previous set (v3)
    RESUME = 0x06  # {"session": str, "secret": str}: instead of HELLO, take over a detached session (v4)


class AgentMsg(enum.IntEnum):
    WELCOME = 0x81  # Welcome.to_json()
    PACKETS = 0x82  # packet batch for the local TUN
    STATS = 0x83  # {counter: int}
    MIRROR = 0x84  # batch like PACKETS, but bare IPv4 packets copied from the pod's inbound traffic (v2)
    STEAL_STATE = 0x85  # StealState.to_json(): the answer to each STEAL (v3)
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
    """A control body as a dict; the peer decides its contents, so callers check every field."""
    if len(body) > MAX_CONTROL:
        raise Malformed(f"control body of {len(body)} bytes (at most {MAX_CONTROL})")
    try:
        value = json.loads(body)
    except RecursionError:  # the decoder recurses per nesting level; MAX_CONTROL bounds the work
        raise Malformed("control body nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"bad control body: {e}") from None
    if not isinstance(value, dict):
        raise Malformed("control body is not an object")
    return value


def pack_packets(packets: list[bytes]) -> bytes:
    """A PACKETS (or MIRROR) body."""
    return b"".join(part for p in packets for part in (_LEN.pack(len(p)), p))


FRAME_HEADER = _HEADER.size
PACKET_LENGTH = _LEN.size


# In place, for the pump's batches (a body built in a buffer): a frame's header before it,
# (buf, offset, length, kind), and a packet's length, (buf, offset, length). The structs' own
# methods, not functions around them: a Python call per packet costs more than the packing.
frame_header_into: Callable[[bytearray, int, int, int], None] = _HEADER.pack_into
packet_length_into: Callable[[bytearray, int, int], None] = _LEN.pack_into


def unpack_packets(body: bytes | memoryview) -> list[bytes | memoryview]:
    """Split a PACKETS body (slices of the same type: views of a memoryview); a truncated batch
    is Malformed as a whole."""
    out: list[bytes | memoryview] = []
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


# Bodies handed on as memoryviews of the received data: the packet batches, which are only
# split and written to the TUN. Everything else (JSON, mirror copies) gets bytes of its own.
_VIEW_KINDS = frozenset({ClientMsg.PACKETS, AgentMsg.PACKETS})


class FrameReader:
    """Turns a byte stream into frames, skipping oversized ones without buffering them.

    Frames that arrive whole (each SSH message carries whole frames from our peer) are cut
    from the data as it came, without a copy; only a frame split across messages is buffered.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self.oversized = 0

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, bytes | memoryview]]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if self._buf:
            self._buf += data
            yield from self._buffered()
            return
        view = memoryview(data)
        pos, end = 0, len(view)
        while end - pos >= _HEADER.size:
            length, kind = _HEADER.unpack_from(view, pos)
            stop = pos + _HEADER.size + length
            if length > MAX_BODY or stop > end:
                break
            body = view[pos + _HEADER.size : stop]
            yield kind, body if kind in _VIEW_KINDS else bytes(body)
            pos = stop
        if pos < end:
            self._buf += view[pos:]
            yield from self._buffered()

    def whole(self, data: bytes | memoryview) -> tuple[int, memoryview] | None:
        """`data` as one packet batch, when it is exactly one whole PACKETS frame in a memoryview
        with nothing buffered (the usual SSH message between our ends): feed's result without
        its generator, per message on the packet path. None: feed it."""
        if self._buf or self._skip or type(data) is not memoryview or len(data) < _HEADER.size:
            return None
        length, kind = _HEADER.unpack_from(data)
        if length + _HEADER.size != len(data) or length > MAX_BODY or kind not in _VIEW_KINDS:
            return None
        return kind, data[_HEADER.size :]

    def _buffered(self) -> Iterator[tuple[int, bytes]]:
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


MIN_MTU, MAX_MTU = 576, 65535
IPV6_MIN_MTU = 1280  # the kernel turns IPv6 off on a device with less
MAX_RESOLV_CONF = 64 * 1024
MAX_POD_ADDRS = 32
_SESSION_ID = re.compile(r"[0-9a-f]{1,32}")
_SECRET = re.compile(r"[0-9a-f]{64}")  # 32 random bytes


def not_unicast(packed: bytes) -> bool:
    """An IPv4 address no real host or tunnel end has: this-network (0/8, with the unspecified
    address), loopback, link-local, multicast, reserved and broadcast (224/3 together)."""
    first = packed[0]
    return first == 0 or first == 127 or first >= 224 or (first == 169 and packed[1] == 254)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "a boolean",
          float: "a number", type(None): "null"}


def _typed(d: dict[str, Any], name: str, kind: type) -> Any:
    if name not in d:
        raise Malformed(f"{name} missing")
    value = d[name]
    if type(value) is not kind:  # exact: a bool is not an int, a float not a version
        raise Malformed(f"{name} must be {_KINDS[kind]}, not {_KINDS.get(type(value), type(value).__name__)}")
    return value


def _unicast(value: object, what: str) -> str:
    if type(value) is not str or len(value) > 15:
        raise Malformed(f"{what} is not an IPv4 address")
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise Malformed(f"{what} {_short(value)} is not an IPv4 address") from None
    if not_unicast(addr.packed):
        raise Malformed(f"{what} {addr} is not a unicast address")
    return str(addr)


def _unicast6(value: object, what: str) -> str:
    """A global or unique-local IPv6 address: one a pod or a tunnel end can have."""
    if type(value) is not str or len(value) > 39:
        raise Malformed(f"{what} is not an IPv6 address")
    try:
        addr = ipaddress.IPv6Address(value)
    except ValueError:
        raise Malformed(f"{what} {_short(value)} is not an IPv6 address") from None
    if addr.scope_id is not None:  # Python parses "fd00::1%anything"; it would reach nft scripts
        raise Malformed(f"{what} {_short(value)} has a scope")
    if (addr.is_multicast or addr.is_loopback or addr.is_unspecified or addr.is_link_local
            or addr.is_site_local or addr.ipv4_mapped is not None):
        raise Malformed(f"{what} {addr} is not a unicast address")
    return str(addr)


def _addr_list(d: dict[str, Any], name: str, check: Callable[[object, str], str]) -> list[str]:
    listed = _typed(d, name, list)
    if len(listed) > MAX_POD_ADDRS:
        raise Malformed(f"{len(listed)} {name} (at most {MAX_POD_ADDRS})")
    return list(dict.fromkeys(check(a, "pod address") for a in listed))


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
    # v4: what RESUME must quote (kept in memory only), and how long the agent keeps a detached session.
    secret: str = dataclasses.field(default="", repr=False)
    resume_timeout: float = 0.0
    # When the session carries IPv6 (the pod has a global or unique-local address); "" and [] when not.
    client_addr6: str = ""
    agent_addr6: str = ""
    pod_addrs6: list[str] = dataclasses.field(default_factory=list)
    # The pod has IPv6 but this session cannot carry it: why (for the user; "" otherwise).
    ipv6_off: str = ""

    @property
    def client_addrs(self) -> list[str]:
        """The client end's addresses, IPv4 first."""
        return [self.client_addr, *([self.client_addr6] if self.client_addr6 else [])]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.client_addr6:  # an IPv4-only session says nothing of IPv6
            for name in ("client_addr6", "agent_addr6", "pod_addrs6"):
                del d[name]
        if not self.ipv6_off:
            del d["ipv6_off"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], offered: int = VERSION) -> "Welcome":
        """Checked field by field: these values become addresses, routes, nft rules and a file.

        Messages name the field and quote at most a short, escaped value: they reach the terminal.
        """
        version = _typed(d, "version", int)
        if not MIN_VERSION <= version <= min(offered, VERSION):
            raise Malformed(f"version {_short(version)} out of range {MIN_VERSION}-{min(offered, VERSION)}")
        session = _typed(d, "session", str)
        if not _SESSION_ID.fullmatch(session):
            raise Malformed("session is not a short hex id")
        client = _unicast(d.get("client_addr"), "client_addr")
        agent = _unicast(d.get("agent_addr"), "agent_addr")
        if client == agent:
            raise Malformed(f"client_addr and agent_addr are both {client}")
        mtu = _typed(d, "mtu", int)
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise Malformed(f"mtu {_short(mtu)} out of range {MIN_MTU}-{MAX_MTU}")
        pod_addrs = _addr_list(d, "pod_addrs", _unicast)
        if {client, agent} & set(pod_addrs):
            raise Malformed("a pod address is a tunnel address")
        client6 = agent6 = ""
        pod_addrs6: list[str] = []
        if d.get("client_addr6", "") != "" or d.get("agent_addr6", "") != "":
            client6 = _unicast6(d.get("client_addr6"), "client_addr6")
            agent6 = _unicast6(d.get("agent_addr6"), "agent_addr6")
            if client6 == agent6:
                raise Malformed(f"client_addr6 and agent_addr6 are both {client6}")
            if mtu < IPV6_MIN_MTU:
                raise Malformed(f"mtu {mtu} too small for IPv6 (at least {IPV6_MIN_MTU})")
            pod_addrs6 = _addr_list(d, "pod_addrs6", _unicast6)
            if {client6, agent6} & set(pod_addrs6):
                raise Malformed("a pod address is a tunnel address")
        resolv_conf = _typed(d, "resolv_conf", str)
        try:
            size = len(resolv_conf.encode())
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file can hold it
            raise Malformed("resolv_conf is not valid text") from None
        if size > MAX_RESOLV_CONF:
            raise Malformed(f"resolv_conf of {size} bytes (at most {MAX_RESOLV_CONF})")
        secret, resume_timeout = "", 0.0
        if version >= RESUME_VERSION:
            secret = _typed(d, "secret", str)
            if not _SECRET.fullmatch(secret):
                raise Malformed("secret is not 64 hex digits")
            resume_timeout = d.get("resume_timeout")
            if type(resume_timeout) not in (int, float) or not 0 <= resume_timeout <= MAX_RESUME_TIMEOUT:
                raise Malformed(f"resume_timeout {_short(resume_timeout)} out of range 0-{MAX_RESUME_TIMEOUT}")
        ipv6_off = d.get("ipv6_off", "")
        if type(ipv6_off) is not str or len(ipv6_off) > MAX_REASON:
            raise Malformed("ipv6_off is not a short text")
        return cls(version, session, client, agent, mtu, pod_addrs, resolv_conf, secret, float(resume_timeout),
                   client6, agent6, pod_addrs6, ipv6_off)


def resume(session: str, secret: str) -> bytes:
    return control(ClientMsg.RESUME, {"session": session, "secret": secret})


def parse_resume(body: bytes) -> tuple[str, str]:
    """RESUME's session id and secret, shape-checked only: the agent compares them."""
    d = parse_control(body)
    session, secret = d.get("session"), d.get("secret")
    if type(session) is not str or not _SESSION_ID.fullmatch(session):
        raise Malformed("RESUME session is not a short hex id")
    if type(secret) is not str or not _SECRET.fullmatch(secret):
        raise Malformed("RESUME secret is not 64 hex digits")
    return session, secret


# Steal (v3). The JSON object keys of a port map are the pod ports as decimal strings.
MAX_EXCLUDE = 64
MAX_FILTERED = 16
MAX_REGEX = 1024
MAX_REASON = 200
_PORT_KEY = re.compile(r"[1-9][0-9]{0,4}")
_STOLEN = re.compile(r"(tcp|udp)/[1-9][0-9]{0,4}")


def _port(value: object, what: str) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise Malformed(f"{what} {_short(value)} is not a port 1-65535")
    return value


def _port_map(value: object, what: str) -> dict[int, int]:
    if type(value) is not dict or len(value) > MAX_PORTS:
        raise Malformed(f"{what} must be an object of at most {MAX_PORTS} pod port: local port pairs")
    out: dict[int, int] = {}
    for key, local in value.items():
        if not _PORT_KEY.fullmatch(key):
            raise Malformed(f"{what} pod port {_short(key)} is not a port 1-65535")
        out[_port(int(key), f"{what} pod port")] = _port(local, f"{what} local port")
    return out


def cidr(value: object) -> str:
    """An IPv4 or IPv6 address or network (host bits dropped), normalised; Malformed otherwise."""
    # No IPv6 scope ("fe80::1%eth0"): a source network has none, and it would reach an nft script.
    if type(value) is not str or len(value) > 43 or "%" in value:  # 43: the longest IPv6 address and "/128"
        raise Malformed(f"{_short(value)} is not an IP address or CIDR")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise Malformed(f"{_short(value)} is not an IP address or CIDR") from None


def regex(value: object, what: str) -> str | None:
    """A pattern Python's re accepts (None: no filter of that kind)."""
    if value is None:
        return None
    if type(value) is not str or len(value) > MAX_REGEX:
        raise Malformed(f"{what} must be a string of at most {MAX_REGEX} characters")
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999} overflows
        raise Malformed(f"{what} {_short(value)} is not a valid regex: {e}") from None
    return value


MAX_SINGLE_FILTERS = 16  # in one all_of or any_of


@dataclasses.dataclass(frozen=True)
class FilteredSteal:
    """HTTP requests to pod port `port` that match go to local port `local`, the rest to the pod
    (agent/steal/filters.py says what matching is)."""

    port: int
    local: int
    header: str | None  # against each `Name: value` header line, case-insensitively
    path: str | None  # against the request path, and the path with its query
    method: str | None = None  # version 5 on, like all_of and any_of
    all_of: tuple[tuple[str, str], ...] = ()  # (kind, pattern): "header", "path" or "method"
    any_of: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "local": self.local, "header": self.header, "path": self.path}
        if self.method is not None:
            out["method"] = self.method
        for name in ("all_of", "any_of"):
            if getattr(self, name):
                out[name] = [{kind: pattern} for kind, pattern in getattr(self, name)]
        return out

    def extended(self) -> bool:
        """Has what only a version-5 agent understands."""
        return self.method is not None or bool(self.all_of or self.any_of)

    @classmethod
    def from_json(cls, d: object) -> "FilteredSteal":
        if type(d) is not dict:
            raise Malformed("a filtered steal must be an object")
        header, path = regex(d.get("header"), "header filter"), regex(d.get("path"), "path filter")
        method = _method(d.get("method"))
        all_of, any_of = _singles(d.get("all_of"), "all_of"), _singles(d.get("any_of"), "any_of")
        if header is None and path is None and method is None and not all_of and not any_of:
            raise Malformed("a filtered steal needs a header, path or method filter, all_of or any_of")
        return cls(_port(d.get("port"), "filtered port"), _port(d.get("local"), "filtered local port"), header, path,
                   method, all_of, any_of)


def _method(value: object) -> str | None:
    if value is None:
        return None
    if type(value) is not str or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}", value):
        raise Malformed(f"method filter {_short(value)} is not an HTTP method")
    return value


def _singles(value: object, what: str) -> tuple[tuple[str, str], ...]:
    """all_of / any_of: a list of one-key objects {"header"|"path"|"method": pattern}."""
    if value is None:
        return ()
    if type(value) is not list or not 0 < len(value) <= MAX_SINGLE_FILTERS:
        raise Malformed(f"{what} must be a list of 1 to {MAX_SINGLE_FILTERS} filters")
    out = []
    for item in value:
        if type(item) is not dict or len(item) != 1:
            raise Malformed(f"each {what} filter must be an object with one of header, path, method")
        (kind, pattern), = item.items()
        if type(pattern) is not str:
            raise Malformed(f"each {what} filter's pattern must be a string")
        if kind == "method":
            out.append((kind, str(_method(pattern))))
        elif kind in ("header", "path"):
            out.append((kind, str(regex(pattern, f"{what} {kind} filter"))))
        else:
            raise Malformed(f"each {what} filter must be an object with one of header, path, method")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class StealRequest:
    """STEAL: what the session steals from now on (empty: nothing); sources in `exclude` keep the pod."""

    tcp: dict[int, int] = dataclasses.field(default_factory=dict)  # pod port -> local port
    udp: dict[int, int] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # IPv4 and IPv6 CIDRs
    filtered: tuple[FilteredSteal, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"tcp": {str(p): l for p, l in sorted(self.tcp.items())},
                "udp": {str(p): l for p, l in sorted(self.udp.items())},
                "exclude": list(self.exclude), "filtered": [f.to_json() for f in self.filtered]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StealRequest":
        exclude, filtered = d.get("exclude", []), d.get("filtered", [])
        if type(exclude) is not list or len(exclude) > MAX_EXCLUDE:
            raise Malformed(f"exclude must be a list of at most {MAX_EXCLUDE} CIDRs")
        if type(filtered) is not list or len(filtered) > MAX_FILTERED:
            raise Malformed(f"filtered must be a list of at most {MAX_FILTERED} filters")
        return cls(_port_map(d.get("tcp", {}), "tcp"), _port_map(d.get("udp", {}), "udp"),
                   tuple(dict.fromkeys(map(cidr, exclude))), tuple(map(FilteredSteal.from_json, filtered)))


def steal(request: StealRequest) -> bytes:
    return control(ClientMsg.STEAL, request.to_json())


def parse_steal(body: bytes) -> StealRequest:
    return StealRequest.from_json(parse_control(body))


@dataclasses.dataclass(frozen=True)
class StealState:
    """STEAL_STATE: which `proto/port`s are stolen now, and why others were refused."""

    stolen: tuple[str, ...]
    refused: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"stolen": list(self.stolen), "refused": self.refused}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StealState":
        """Checked like WELCOME: the reasons reach the terminal (the caller still makes them printable)."""
        most = 2 * MAX_PORTS + MAX_FILTERED
        stolen, refused = _typed(d, "stolen", list), _typed(d, "refused", dict)
        if len(stolen) > most or len(refused) > most:
            raise Malformed(f"more than {most} ports in a STEAL_STATE")
        for name in [*stolen, *refused]:
            if type(name) is not str or not _STOLEN.fullmatch(name) or not 0 < int(name[4:]) < 65536:
                raise Malformed(f"{_short(name)} is not tcp/PORT or udp/PORT")
        if not all(type(r) is str for r in refused.values()):
            raise Malformed("a refusal reason is not a string")
        return cls(tuple(stolen), {k: v[:MAX_REASON] for k, v in refused.items()})
