"""Links, addresses, routes and forwarding, via rtnetlink (pyroute2).

Every function here acts on the namespace of the calling thread, so callers run
them through `NetNs.call`.
"""
from __future__ import annotations

import contextlib
import ipaddress

from pyroute2 import IPRoute


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
    """lo up and a default route through `name`: the whole namespace uses it."""
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


def uplink_mtu(default: int = 1500) -> int:
    """MTU of the device holding the default route (else the first non-lo link)."""
    with IPRoute() as ipr:
        links = {l["index"]: l for l in ipr.get_links()}
        for r in ipr.get_default_routes(family=2):
            oif = r.get_attr("RTA_OIF")
            if oif in links:
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
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1" if on else "0")
