"""A minimal authoritative DNS server (UDP, dpkt) playing the cluster's DNS.

Usage: dns_server HOST ZONEFILE, the zone file holding "name address" lines.
A and AAAA questions for known names get answers (AAAA: none, NOERROR);
anything else gets NXDOMAIN, so search-domain lists resolve as in a cluster.
"""
from __future__ import annotations

import socket
import sys

import dpkt


def answer(query: bytes, zone: dict[str, str]) -> bytes | None:
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
    elif q.type == dpkt.dns.DNS_A:
        rr = dpkt.dns.DNS.RR(name=q.name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN, ttl=5)
        rr.ip = socket.inet_aton(zone[name])
        msg.an = [rr]
    return bytes(msg)


def main() -> None:
    host, zonefile = sys.argv[1], sys.argv[2]
    with open(zonefile) as f:
        zone = {n.lower(): a for n, a in (line.split() for line in f if line.strip())}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 53))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        reply = answer(data, zone)
        if reply:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
