"""A minimal authoritative DNS server (UDP, dpkt) playing the cluster's DNS.

Usage: dns_server HOST[,HOST...] ZONEFILE, the zone file holding "name address" lines
(a name may have an IPv4 and an IPv6 line). It listens on every HOST, IPv4 or IPv6.
A and AAAA questions for known names get the addresses of that family (none: an empty
NOERROR answer); anything else gets NXDOMAIN, so search-domain lists resolve as in a cluster.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import sys

import dpkt

_TYPES = {dpkt.dns.DNS_A: 4, dpkt.dns.DNS_AAAA: 6}


def answer(query: bytes, zone: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]) -> bytes | None:
    try:
        msg = dpkt.dns.DNS(query)
    except (dpkt.UnpackError, IndexError):
        return None
    if msg.qr != dpkt.dns.DNS_Q or len(msg.qd) != 1:
        return None
    q = msg.qd[0]
    name = q.name.rstrip(".").lower()
    msg.qr, msg.aa, msg.ra = dpkt.dns.DNS_R, 1, 1
    msg.an = []
    if name not in zone:
        msg.rcode = dpkt.dns.DNS_RCODE_NXDOMAIN
    elif q.type in _TYPES:
        for addr in zone[name]:
            if addr.version == _TYPES[q.type]:
                rr = dpkt.dns.DNS.RR(name=q.name, type=q.type, cls=dpkt.dns.DNS_IN, ttl=5)
                if addr.version == 4:
                    rr.ip = addr.packed
                else:
                    rr.ip6 = addr.packed
                msg.an.append(rr)
    return bytes(msg)


def main() -> None:
    hosts, zonefile = sys.argv[1].split(","), sys.argv[2]
    zone: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    with open(zonefile) as f:
        for line in f:
            if line.strip():
                name, addr = line.split()
                zone.setdefault(name.lower(), []).append(ipaddress.ip_address(addr))
    socks = []
    for host in hosts:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 53))
        socks.append(sock)
    print("ready", flush=True)
    while True:
        for sock in select.select(socks, [], [])[0]:
            data, peer = sock.recvfrom(4096)
            reply = answer(data, zone)
            if reply:
                sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
