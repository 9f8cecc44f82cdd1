"""The few rtnetlink requests mirrord-ns makes, over a plain netlink socket.

pyroute2 does all of this and much more, but importing it took 56 ms of `run -- true`'s
~0.4 s (python -X importtime), and `run` needs only: a link up, addresses, routes and
policy rules added and removed, and the dumps that find its own again. Message layouts
are linux/rtnetlink.h, if_addr.h, fib_rules.h. Like everything in netns/, each call acts
on the network namespace of the calling thread (the socket is made there).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import NamedTuple

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_F_REQUEST, _F_ACK, _F_EXCL, _F_CREATE, _F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
_NLA_F_NESTED = 0x8000
_HEADER = struct.Struct("IHHII")

IFLA_IFNAME, IFLA_MTU, IFLA_AF_SPEC = 3, 4, 26
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS, IFA_PROTO = 1, 2, 3, 8, 11
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE = 6, 10, 15
RTN_UNICAST, RTN_LOCAL = 1, 2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST, RT_SCOPE_NOWHERE = 0, 253, 254, 255
RT_TABLE_MAIN = 254
_FR_ACT_TO_TBL = 1
_IFF_UP = 0x1
_IFLA_INET_CONF, _IPV4_DEVCONF_FORWARDING = 1, 1
_IFLA_INET6_ADDR_GEN_MODE, _IN6_ADDR_GEN_MODE_NONE = 8, 1

_IFINFO = struct.Struct("BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
# fib_rule_hdr has rtmsg's layout: family, dst_len, src_len, tos, table, res1, res2, action, flags.


class Message(NamedTuple):
    """One message of a reply: its fixed header's fields and its attributes (raw)."""

    kind: int
    fields: tuple[int, ...]
    attrs: dict[int, bytes]

    def text(self, attr: int) -> str | None:
        raw = self.attrs.get(attr)
        return raw.split(b"\0", 1)[0].decode() if raw is not None else None

    def u32(self, attr: int) -> int | None:
        raw = self.attrs.get(attr)
        return struct.unpack_from("I", raw)[0] if raw is not None and len(raw) >= 4 else None

    def address(self, attr: int) -> str | None:
        raw = self.attrs.get(attr)
        if raw is None or len(raw) not in (4, 16):
            return None
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        out[kind & ~_NLA_F_NESTED] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


_FIXED = {RTM_NEWLINK: _IFINFO, RTM_NEWADDR: _IFADDR, RTM_NEWROUTE: _RTMSG, RTM_NEWRULE: _RTMSG}


def _exchange(kind: int, flags: int, body: bytes) -> list[Message]:
    """Send one request; the messages of its answer. OSError for a negative acknowledgement."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, 1, 0) + body)
        out: list[Message] = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError(0, "malformed rtnetlink reply")
                payload = data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3
                if mtype == _NLMSG_ERROR:
                    (error,) = struct.unpack_from("i", payload)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return out  # the ACK
                if mtype == _NLMSG_DONE:
                    return out
                fixed = _FIXED.get(mtype)
                if fixed is not None:
                    out.append(Message(mtype, fixed.unpack_from(payload), _attrs(payload, fixed.size)))
                    if not flags & (_F_DUMP | _F_ACK):
                        return out  # a GET's single answer


def _change(kind: int, body: bytes, create: bool = False) -> None:
    _exchange(kind, _F_REQUEST | _F_ACK | (_F_CREATE | _F_EXCL if create else 0), body)


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


# --- links
def index(name: str) -> int:
    """The index of link `name` here; OSError if there is none."""
    return socket.if_nametoindex(name)


def set_up(idx: int, mtu: int | None = None) -> None:
    extra = attr(IFLA_MTU, struct.pack("I", mtu)) if mtu else b""
    _change(RTM_NEWLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, idx, _IFF_UP, _IFF_UP) + extra)


def set_ipv4_forwarding(idx: int, on: bool) -> None:
    """IPv4 forwarding of one device: RTM_SETLINK-style IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF, which
    needs no writable /proc/sys."""
    conf = attr(_IPV4_DEVCONF_FORWARDING, struct.pack("I", int(on)))
    spec = attr(IFLA_AF_SPEC | _NLA_F_NESTED,
                attr(socket.AF_INET | _NLA_F_NESTED, attr(_IFLA_INET_CONF | _NLA_F_NESTED, conf)))
    _change(RTM_NEWLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, idx, 0, 0) + spec)


def set_no_ipv6_link_local(idx: int) -> None:
    """No IPv6 link-local address when the device comes up, so the kernel sends no duplicate
    address detection, router solicitation or MLD report from it: IFLA_AF_SPEC/AF_INET6/
    IFLA_INET6_ADDR_GEN_MODE (addr_gen_mode none), which needs no writable /proc/sys."""
    mode = attr(_IFLA_INET6_ADDR_GEN_MODE, struct.pack("B", _IN6_ADDR_GEN_MODE_NONE))
    spec = attr(IFLA_AF_SPEC | _NLA_F_NESTED, attr(socket.AF_INET6 | _NLA_F_NESTED, mode))
    _change(RTM_NEWLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, idx, 0, 0) + spec)


def links() -> list[Message]:
    return _exchange(RTM_GETLINK, _F_REQUEST | _F_DUMP, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))


# --- addresses
def _ifaddr(idx: int, address: str, prefixlen: int, label: str | None, nodad: bool, proto: int = 0) -> bytes:
    packed = _packed(address)
    body = _IFADDR.pack(_family(address), prefixlen, 0, RT_SCOPE_UNIVERSE, idx)
    body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
    if label:
        body += attr(IFA_LABEL, label.encode() + b"\0")
    if proto:
        body += attr(IFA_PROTO, bytes([proto]))
    if nodad:
        body += attr(IFA_FLAGS, struct.pack("I", IFA_F_NODAD))
    return body


def add_address(idx: int, address: str, prefixlen: int, label: str | None = None, proto: int = 0) -> None:
    """EEXIST (an OSError) if the link already has it. IPv6 addresses skip duplicate address
    detection: ours are point-to-point on a TUN, and DAD would hold them back a second.
    `proto` (IFA_PROTO, Linux 6.1) marks an address as ours where a label cannot: IPv6 has none."""
    _change(RTM_NEWADDR, _ifaddr(idx, address, prefixlen, label, nodad=_family(address) == socket.AF_INET6,
                                 proto=proto), create=True)


def delete_address(idx: int, address: str, prefixlen: int) -> None:
    _change(RTM_DELADDR, _ifaddr(idx, address, prefixlen, None, nodad=False))


def addresses(family: int = socket.AF_UNSPEC) -> list[Message]:
    """Every address here; fields: family, prefixlen, flags, scope, index."""
    return _exchange(RTM_GETADDR, _F_REQUEST | _F_DUMP, _IFADDR.pack(family, 0, 0, 0, 0))


def has_address(idx: int, family: int) -> bool:
    """Whether link `idx` has an address of `family` (a TUN we gave IPv6 carries IPv6)."""
    return any(a.fields[4] == idx for a in addresses(family))


# --- routes
def _small(table: int) -> int:
    """The header's 8-bit table field: tables past 255 are given by attribute only (as iproute2 does)."""
    return table if table < 256 else 0


def _rtmsg(dst: str, dst_len: int, *, oif: int | None, gateway: str | None, proto: int, table: int,
           kind: int, scope: int) -> bytes:
    body = _RTMSG.pack(_family(dst), dst_len, 0, 0, _small(table), proto, scope, kind, 0)
    if dst_len:
        body += attr(RTA_DST, _packed(dst))
    if oif is not None:
        body += attr(RTA_OIF, struct.pack("I", oif))
    if gateway:
        body += attr(RTA_GATEWAY, _packed(gateway))
    return body + attr(RTA_TABLE, struct.pack("I", table))


def add_route(dst: str, dst_len: int, *, oif: int | None = None, gateway: str | None = None, proto: int = 0,
              table: int = RT_TABLE_MAIN, kind: int = RTN_UNICAST) -> None:
    """EEXIST (an OSError) if that route is there already."""
    scope = RT_SCOPE_HOST if kind == RTN_LOCAL else RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    _change(RTM_NEWROUTE, _rtmsg(dst, dst_len, oif=oif, gateway=gateway, proto=proto, table=table, kind=kind,
                                 scope=scope), create=True)


def delete_route(dst: str, dst_len: int, *, proto: int = 0, table: int = RT_TABLE_MAIN,
                 kind: int = RTN_UNICAST) -> None:
    """The route matching these, whatever its scope (the kernel matches proto only when it is
    given); ESRCH if none."""
    _change(RTM_DELROUTE, _rtmsg(dst, dst_len, oif=None, gateway=None, proto=proto, table=table, kind=kind,
                                 scope=RT_SCOPE_NOWHERE))


def routes(family: int) -> list[Message]:
    """Every route of `family`, any table; fields as _RTMSG (table 252+ in RTA_TABLE)."""
    return _exchange(RTM_GETROUTE, _F_REQUEST | _F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def route_to(address: str) -> Message:
    """The route the kernel would take to `address` (`ip route get`)."""
    body = _RTMSG.pack(_family(address), 8 * len(_packed(address)), 0, 0, 0, 0, 0, 0, 0)
    answer = _exchange(RTM_GETROUTE, _F_REQUEST, body + attr(RTA_DST, _packed(address)))
    if not answer:
        raise OSError(0, f"no route answer for {address}")
    return answer[0]


# --- policy rules (IPv4 unless `family` says AF_INET6: each family has its own rules)
def _rule(fwmark: int, table: int, priority: int | None, family: int) -> bytes:
    body = _RTMSG.pack(family, 0, 0, 0, _small(table), 0, 0, _FR_ACT_TO_TBL, 0)
    body += attr(FRA_FWMARK, struct.pack("I", fwmark)) + attr(FRA_TABLE, struct.pack("I", table))
    return body + (attr(FRA_PRIORITY, struct.pack("I", priority)) if priority is not None else b"")


def add_rule(fwmark: int, table: int, priority: int, family: int = socket.AF_INET) -> None:
    """`ip [-6] rule add fwmark MARK lookup TABLE priority P`; EEXIST if it is there."""
    _change(RTM_NEWRULE, _rule(fwmark, table, priority, family), create=True)


def delete_rule(fwmark: int, table: int, priority: int | None, family: int = socket.AF_INET) -> None:
    _change(RTM_DELRULE, _rule(fwmark, table, priority, family))


def rules(family: int = socket.AF_INET) -> list[Message]:
    return _exchange(RTM_GETRULE, _F_REQUEST | _F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def table_of(msg: Message) -> int:
    """A route's or rule's table: the attribute when present (tables above 255 need it)."""
    return msg.u32(RTA_TABLE) or msg.fields[4]
