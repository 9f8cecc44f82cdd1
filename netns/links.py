"""Links, addresses, routes and forwarding, via rtnetlink (pyroute2).

Every function here acts on the namespace of the calling thread, so callers run
them through `NetNs.call`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct

from pyroute2 import IPRoute

from mirrord_tun.netns import routes

_RTM_SETLINK = 19
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLA_F_NESTED = 0x8000
_IFLA_AF_SPEC = 26
_IFLA_INET_CONF = 1
_IPV4_DEVCONF_FORWARDING = 1


def _index(ipr: IPRoute, name: str) -> int:
    return ipr.link_lookup(ifname=name)[0]


def bring_up_tun(name: str, addresses: list[str], mtu: int, peers: list[str] = []) -> None:
    """Give a TUN /32 addresses, an MTU, and routes to /32 peers behind it."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        # IPv4 only: no link-local address, router solicitations or MLD noise on the tunnel.
        with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        ipr.link("set", index=idx, mtu=mtu, state="up")
        for addr in addresses:
            ipr.addr("add", index=idx, address=addr, prefixlen=32)
        for peer in peers:
            ipr.route("add", dst=peer, dst_len=32, oif=idx)


def make_default_via(name: str) -> None:
    """lo up and a default route through `name`: the whole namespace uses it, and
    nothing opens a connection into it through `name` (the guard goes with the namespace)."""
    routes.refuse_inbound(name)
    with IPRoute() as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        ipr.route("add", dst="0.0.0.0", dst_len=0, oif=_index(ipr, name))


def ipv4_addresses(exclude_prefix: str = "mrd") -> list[str]:
    """The namespace's own IPv4 addresses, skipping loopback and our TUNs."""
    out: list[str] = []
    with IPRoute() as ipr:
        names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        for a in ipr.get_addr(family=2):
            name = names.get(a["index"], "")
            addr = a.get_attr("IFA_ADDRESS")
            if name == "lo" or name.startswith(exclude_prefix) or ipaddress.ip_address(addr).is_loopback:
                continue
            out.append(addr)
    return out


def ipv4_addresses_on(prefix: str) -> list[str]:
    """IPv4 addresses of the links whose name starts with `prefix`."""
    with IPRoute() as ipr:
        names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)
                if names.get(a["index"], "").startswith(prefix)]


def uplink_mtu(default: int = 1500) -> int:
    """MTU of the device holding the default route (else the first non-lo link)."""
    with IPRoute() as ipr:
        links = {l["index"]: l for l in ipr.get_links()}
        for r in ipr.get_default_routes(family=2):
            oif = r.get_attr("RTA_OIF")
            if oif in links and r["type"] == 1:  # unicast: not the filtered steal's `local 0.0.0.0/0` on lo
                return int(links[oif].get_attr("IFLA_MTU"))
        for link in links.values():
            if link.get_attr("IFLA_IFNAME") != "lo":
                return int(link.get_attr("IFLA_MTU"))
    return default


def ipv4_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the namespace already has as an address or a route."""
    nets: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            nets.append(ipaddress.ip_network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False))
        for r in ipr.get_routes(family=2, table=254):
            dst = r.get_attr("RTA_DST")
            if dst:
                nets.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
    return nets


def read_ip_forward() -> bool:
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        return f.read().strip() == "1"


def write_ip_forward(on: bool) -> None:
    """net.ipv4.ip_forward; OSError where /proc/sys is read-only (unprivileged containers)."""
    # Already so: no write, so a container whose /proc/sys is read-only works when
    # forwarding was set up front (compose `sysctls:`, a pod's securityContext.sysctls).
    if read_ip_forward() == on:
        return
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1" if on else "0")


def device_forwarding(name: str) -> bool:
    with open(f"/proc/sys/net/ipv4/conf/{name}/forwarding") as f:
        return f.read().strip() == "1"


def set_device_forwarding(name: str, on: bool) -> None:
    """IPv4 forwarding of one device over rtnetlink, which needs no writable /proc/sys.

    The kernel checks forwarding on the device a packet comes in through, so this on
    the tunnel's TUN and on the links replies arrive on is what ip_forward=1 would do
    for them. RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF takes a nested
    u32 per devconf entry; pyroute2 only knows the flat form the kernel reports.
    """
    with IPRoute() as ipr:
        index = _index(ipr, name)

    def nla(kind: int, payload: bytes) -> bytes:
        return struct.pack("HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)

    conf = nla(_IPV4_DEVCONF_FORWARDING, struct.pack("I", int(on)))
    spec = nla(_IFLA_AF_SPEC | _NLA_F_NESTED, nla(socket.AF_INET | _NLA_F_NESTED, nla(_IFLA_INET_CONF | _NLA_F_NESTED, conf)))
    body = struct.pack("BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + spec
    header = struct.pack("IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + body)
        reply = sock.recv(4096)
    (error,) = struct.unpack_from("i", reply, 16)  # NLMSG_ERROR: 0 is the ACK
    if error:
        raise OSError(-error, f"forwarding on {name}: {os.strerror(-error)}")


def links_except(*prefixes: str) -> list[str]:
    """Names of the namespace's links other than lo and those starting with `prefixes`."""
    with IPRoute() as ipr:
        names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
    return [n for n in names if n != "lo" and not n.startswith(prefixes)]


def has_link(name: str) -> bool:
    """Whether the namespace has a link of that name (sysfs would show the mounter's namespace)."""
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))
