"""Links, addresses, routes and forwarding, via rtnetlink (netns/rtnl.py).

Every function here acts on the namespace of the calling thread, so callers run
them through `NetNs.call`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket

from mirrord_tun.netns import routes, rtnl


def _names() -> dict[int, str]:
    return {l.fields[2]: l.text(rtnl.IFLA_IFNAME) or "" for l in rtnl.links()}


def bring_up_tun(name: str, addresses: list[str], mtu: int, peers: list[str] = []) -> None:
    """Give a TUN host addresses (/32, /128), an MTU, and host routes to peers behind it.

    The TUN never has an IPv6 link-local address or duplicate address detection, so the tunnel
    carries no router solicitations or MLD noise and an IPv6 address works at once; IPv6 is
    on only when an IPv6 address is given. The link-local part is set over rtnetlink, before
    the link comes up: where /proc/sys is read-only (an unprivileged agent container) IPv6
    cannot be switched off, and the TUN sent a router solicitation into every IPv4-only session."""
    ipv6 = any(":" in a for a in addresses)
    idx = rtnl.index(name)
    with contextlib.suppress(OSError):  # EAFNOSUPPORT: a kernel without IPv6, nothing to quiet
        rtnl.set_no_ipv6_link_local(idx)
    if ipv6:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("0")
    else:
        with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    rtnl.set_up(idx, mtu)
    for addr in addresses:
        rtnl.add_address(idx, addr, 128 if ":" in addr else 32)
    for peer in peers:
        rtnl.add_route(peer, 128 if ":" in peer else 32, oif=idx)


def make_default_via(name: str) -> None:
    """lo up and a default route through `name` (and an IPv6 one if it has IPv6): the whole
    namespace uses it, and nothing opens a connection into it through `name` (the guard goes
    with the namespace)."""
    routes.refuse_inbound(name)
    idx = rtnl.index(name)
    rtnl.set_up(rtnl.index("lo"))
    rtnl.add_route("0.0.0.0", 0, oif=idx)
    if rtnl.has_address(idx, socket.AF_INET6):  # bring_up_tun gave it IPv6
        rtnl.add_route("::", 0, oif=idx)


def ipv4_addresses(exclude_prefix: str = "mrd") -> list[str]:
    """The namespace's own IPv4 addresses, skipping loopback and our TUNs."""
    names = _names()
    out: list[str] = []
    for a in rtnl.addresses(socket.AF_INET):
        name, addr = names.get(a.fields[4], ""), a.address(rtnl.IFA_ADDRESS)
        if addr is None or name == "lo" or name.startswith(exclude_prefix) or ipaddress.ip_address(addr).is_loopback:
            continue
        out.append(addr)
    return out


def ipv4_addresses_on(prefix: str) -> list[str]:
    """IPv4 addresses of the links whose name starts with `prefix`."""
    names = _names()
    return [addr for a in rtnl.addresses(socket.AF_INET)
            if names.get(a.fields[4], "").startswith(prefix) and (addr := a.address(rtnl.IFA_ADDRESS))]


def uplink_mtu(default: int = 1500) -> int:
    """MTU of the device holding the default route (else the first non-lo link)."""
    links = {l.fields[2]: l for l in rtnl.links()}
    for r in rtnl.routes(socket.AF_INET):
        oif = r.u32(rtnl.RTA_OIF)
        # unicast in the main table: not the filtered steal's `local 0.0.0.0/0` on lo
        if (r.fields[1] == 0 and r.fields[7] == rtnl.RTN_UNICAST and rtnl.table_of(r) == rtnl.RT_TABLE_MAIN
                and oif in links):
            return links[oif].u32(rtnl.IFLA_MTU) or default
    for link in links.values():
        if link.text(rtnl.IFLA_IFNAME) != "lo":
            return link.u32(rtnl.IFLA_MTU) or default
    return default


def ipv4_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the namespace already has as an address or a route."""
    nets: list[ipaddress.IPv4Network] = []
    for a in rtnl.addresses(socket.AF_INET):
        if addr := a.address(rtnl.IFA_ADDRESS):
            nets.append(ipaddress.IPv4Network(f"{addr}/{a.fields[1]}", strict=False))
    for r in rtnl.routes(socket.AF_INET):
        dst = r.address(rtnl.RTA_DST)
        if dst and rtnl.table_of(r) == rtnl.RT_TABLE_MAIN:
            nets.append(ipaddress.IPv4Network(f"{dst}/{r.fields[1]}", strict=False))
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
    for them.
    """
    try:
        rtnl.set_ipv4_forwarding(rtnl.index(name), on)
    except OSError as e:
        raise OSError(e.errno, f"forwarding on {name}: {e.strerror}") from None


def links_except(*prefixes: str) -> list[str]:
    """Names of the namespace's links other than lo and those starting with `prefixes`."""
    names = [l.text(rtnl.IFLA_IFNAME) or "" for l in rtnl.links()]
    return [n for n in names if n and n != "lo" and not n.startswith(prefixes)]


def has_link(name: str) -> bool:
    """Whether the namespace has a link of that name (sysfs would show the mounter's namespace)."""
    try:
        rtnl.index(name)
    except OSError:
        return False
    return True
