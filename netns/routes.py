"""Steer an existing namespace's traffic into a TUN, and give it back.

An attached namespace (a container's) has routes of its own, typically a default
route via its bridge. Instead of replacing them, two /1 routes through the TUN
outrank the default route by prefix length and leave every more specific route
(the container's own subnets) in force. The kernel deletes them with the TUN, so
even a killed `attach` leaves the namespace's original routing working. Only the
pins (below) and the inbound guard outlive the TUN; every route made here
carries RTPROT_MIRRORD and the guard is the nft table INBOUND_TABLE, so the next
attach finds and removes what a killed one left.

The inbound guard (`refuse_inbound`) keeps the tunnel one-way for connections:
whatever the pod's end lets through (a neighbour routing 100.64.0.0/10 via the
pod, a container that flushed the agent's table, a hostile agent), nothing opens a
connection into this namespace through the TUN. Replies to what the namespace
opened, and the ICMP errors that go with them (ping, traceroute, PMTU), pass. The
inbound mirror is unaffected: it delivers over lo, from sockets of its own. With
steal, exactly the local ports the user asked to steal accept new connections to
the tunnel addresses (IPv4 and IPv6), so a hostile agent still reaches nothing else.

Every function acts on the calling thread's namespace: run them via NetNs.call.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import re
import socket
from typing import Callable, Iterable

from mirrord_tun.netns import nft, rtnl

RTPROT_MIRRORD = 77  # a route protocol number of our own (see /etc/iproute2/rt_protos)
HALVES = ("0.0.0.0", "128.0.0.0")  # two /1s: more specific than any default route
HALVES6 = ("::", "8000::")
INBOUND_TABLE = "mirrord_ns_inbound"  # family inet; the prefix marks it as ours, as the agent's tables
_OUR_TUN = re.compile(r"mrd[0-9a-z]{1,12}")  # only names we made go into the nft script
_ANYWHERE = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def add_local_delivery(mark: int, priority: int, family: int = socket.AF_INET) -> None:
    """`ip rule fwmark MARK lookup MARK` and `local 0.0.0.0/0 dev lo` in that table (RTPROT_MIRRORD),
    or with `family` AF_INET6 their IPv6 twins (`ip -6 rule`, `local ::/0`): packets given MARK come
    back up to this namespace's own sockets instead of leaving, the trick TPROXY setups use for the
    replies to a transparent socket. Idempotent. The table number is the mark itself: a namespace
    is unlikely to use such a number for its own tables."""
    lo = rtnl.index("lo")
    for add in (lambda: rtnl.add_rule(mark, mark, priority, family),
                lambda: rtnl.add_route(_ANYWHERE[family], 0, oif=lo, table=mark, proto=RTPROT_MIRRORD,
                                       kind=rtnl.RTN_LOCAL)):
        try:
            add()
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise OSError(e.errno, f"policy routing for mark {mark:#x}: {e.strerror}") from None


def remove_local_delivery(mark: int) -> None:
    """Exactly what add_local_delivery(mark) added for either family, found by mark, table and
    route protocol; nothing if absent."""
    for family, anywhere in _ANYWHERE.items():
        try:
            rules = rtnl.rules(family)
        except OSError:
            if family == socket.AF_INET:
                raise
            continue  # a kernel without IPv6: nothing of that family can be there
        for rule in rules:
            if rule.u32(rtnl.FRA_FWMARK) == mark and rtnl.table_of(rule) == mark:
                with contextlib.suppress(OSError):
                    rtnl.delete_rule(mark, mark, rule.u32(rtnl.FRA_PRIORITY), family)
        with contextlib.suppress(OSError):  # ESRCH: not there
            rtnl.delete_route(anywhere, 0, table=mark, proto=RTPROT_MIRRORD, kind=rtnl.RTN_LOCAL)


def refuse_inbound(tun: str, addrs: Iterable[str] = (), tcp: Iterable[int] = (), udp: Iterable[int] = ()) -> None:
    """Drop every packet from TUN `tun` that opens a connection (see the module's doc), except
    those to one of `addrs` (the tunnel's IPv4 and IPv6 addresses) on the `tcp`/`udp` ports: the
    ports the user asked to steal, whose connections the agent hands in. Calling it again
    replaces the guard in one transaction."""
    if not _OUR_TUN.fullmatch(tun):
        raise ValueError(f"not a TUN of ours: {tun!r}")
    # From the bytes: no IPv6 scope ("%eth0") can reach the nft script.
    checked = [ipaddress.ip_address(ipaddress.ip_address(a).packed) for a in addrs]
    allowed = ""
    for proto, ports in (("tcp", sorted(set(tcp))), ("udp", sorted(set(udp)))):
        if not ports:
            continue
        if not checked or not all(type(p) is int and 0 < p < 65536 for p in ports):
            raise ValueError(f"bad steal ports for the inbound guard: {checked!r} {ports!r}")
        for addr in checked:
            allowed += (f'    iifname "{tun}" {"ip" if addr.version == 4 else "ip6"} daddr {addr} {proto} dport '
                        f'{{ {", ".join(map(str, ports))} }} ct state new accept\n')
    # prerouting rather than input: also nothing forwarded onwards, should the namespace
    # route for others (a container with ip_forward on).
    nft.run(
        f"table inet {INBOUND_TABLE}\nflush table inet {INBOUND_TABLE}\n"  # not delete: 0.3 ms instead of ~15 when absent
        f"table inet {INBOUND_TABLE} {{\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority filter; policy accept;\n"
        f'    iifname "{tun}" ct state established,related accept\n'
        f"{allowed}"
        f'    iifname "{tun}" drop\n'
        "  }\n}\n"
    )


def remove_inbound_guard() -> None:
    nft.delete_table("inet", INBOUND_TABLE)


def remove_leftovers() -> int:
    """Delete the routes and the inbound guard a killed earlier session left; returns how many."""
    n = 0
    if nft.tables("inet", INBOUND_TABLE):
        remove_inbound_guard()
        n += 1
    for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for r in rtnl.routes(family):
            if r.fields[5] != RTPROT_MIRRORD or rtnl.table_of(r) != rtnl.RT_TABLE_MAIN:
                continue
            with contextlib.suppress(OSError):
                rtnl.delete_route(r.address(rtnl.RTA_DST) or anywhere, r.fields[1], proto=RTPROT_MIRRORD)
                n += 1
    return n


def steer_into(name: str, keep: list[str]) -> Callable[[], None]:
    """Route all IPv4 through TUN `name` (and all IPv6 when the TUN has IPv6), except `keep`
    addresses.

    `keep` holds the agent's address when our SSH connection itself lives in
    this namespace: it is pinned (a host route) to the path it takes now, or the
    tunnel would carry its own packets. Inbound connections through the TUN are
    refused before any route leads there. Returns the undo, for after the TUN is gone.
    """
    pins: list[tuple[str, int]] = []

    def undo() -> None:
        for addr, host in pins:
            with contextlib.suppress(OSError):
                rtnl.delete_route(addr, host, proto=RTPROT_MIRRORD)
        remove_inbound_guard()

    refuse_inbound(name)
    try:
        idx = rtnl.index(name)
        for addr in keep:
            now = rtnl.route_to(addr)
            if now.fields[7] == rtnl.RTN_LOCAL:
                continue  # an address of this namespace (a local port-forward): never routed
            host = 128 if ":" in addr else 32
            try:
                rtnl.add_route(addr, host, oif=now.u32(rtnl.RTA_OIF), gateway=now.address(rtnl.RTA_GATEWAY),
                               proto=RTPROT_MIRRORD)
                pins.append((addr, host))
            except OSError as e:
                if e.errno != errno.EEXIST:  # a host route of the namespace's own already pins it
                    raise
        ipv6 = rtnl.has_address(idx, socket.AF_INET6)  # the session carries IPv6: bring_up_tun gave it
        for half in HALVES + (HALVES6 if ipv6 else ()):
            rtnl.add_route(half, 1, oif=idx, proto=RTPROT_MIRRORD)
    except BaseException:
        undo()
        raise
    return undo
