"""Inbound mirror over IPv6 (issue 13), on a dual-stack sandbox (`Sandbox(ipv6=True)`).

The pod serves HTTP on `::`; the client POSTs to the pod's IPv6 address, and `run`'s
program, listening on `::` too, must get byte-identical copies with the client's IPv6
address as peer, while IPv4 keeps being mirrored in the same session. A connection
whose packets carry an IPv6 extension header is served by the pod but not mirrored
(its ports cannot be checked in the kernel's filter): counted, never garbled. The
helpers are tests/test_mirror.py's.
"""
from __future__ import annotations

import asyncio
import difflib
import ipaddress
import os
import re
import socket
import struct
import subprocess
from typing import Iterator

import pytest

from conftest import wait_until
from test_mirror import (HTTP_PORT, PY, Session, assert_all_mirrored, assert_nothing_given_up, assert_nothing_leaked,
                         assert_pod_answered, post, recorder)

from mirrord_tun.mirror import admit, delivery
from mirrord_tun.netns import rtnl
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.sandbox import ADDRS, ADDRS6, Sandbox

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN, nft)")

POD, CLIENT = ADDRS["pod"], ADDRS["client"]
POD6, CLIENT6 = ADDRS6["pod"], ADDRS6["client"]
MAPPED_CLIENT = f"::ffff:{CLIENT}"  # an IPv4 client as a program listening on :: sees it

# One POST on a connection whose every packet carries a destination-options header
# (a sticky IPV6_DSTOPTS: the kernel adds it, with a PadN option filling its 8 bytes).
_EXT_CLIENT = f"""
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.connect(("{POD6}", {HTTP_PORT}))
s.sendall(b"POST /ext HTTP/1.1\\r\\nHost: pod\\r\\nContent-Length: 3000\\r\\nConnection: close\\r\\n\\r\\n" + b"e" * 3000)
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print(answer.decode().splitlines()[0])
"""


# --- the client's gate, without root
def _ip6(src: str, dst: str, next_header: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), next_header, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + l4


def _tcp6(src: str = CLIENT6, dst: str = POD6, dport: int = 80, next_header: int = 6) -> bytes:
    return _ip6(src, dst, next_header, struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0))


def test_admit_ipv6() -> None:
    pods = frozenset({ipaddress.ip_address(POD6).packed, ipaddress.ip_address(POD).packed})
    own = pods | {ipaddress.ip_address("fd00:6d72::2").packed}
    def check(pkt: bytes) -> str | None:
        return admit(pkt, pods, own, lambda port: port == 80)

    assert check(_tcp6()) is None
    assert check(_ip6(CLIENT6, POD6, 17, struct.pack("!HHHH", 5000, 80, 9, 0) + b"q")) is None
    assert check(_tcp6(dport=81)) == "dropped_mirror_port"
    assert check(_tcp6(dst=ADDRS6["svc"])) == "dropped_mirror_destination"
    assert check(_tcp6(next_header=60)) == "dropped_mirror_protocol"  # an extension header first
    for src in ("fe80::1", "ff02::1", "::1", "::", "::ffff:198.18.0.30", "fd00:6d72::2", POD6):
        assert check(_tcp6(src=src)) == "dropped_mirror_source", src
    assert check(_tcp6()[:50]) == "dropped_mirror_malformed"
    assert check(_tcp6()[:39]) == "dropped_mirror_malformed"


# --- the local namespace's routing, installed and removed exactly
def _state() -> str:
    """Runs in the namespace (a child forked from its thread is in it): what routing could change."""
    return subprocess.run(["sh", "-c", "ip rule; ip -6 rule; ip route show table all; ip -6 route show table all;"
                           " ip addr show dev lo; nft list ruleset"], capture_output=True, text=True, check=True).stdout


def _prepare() -> None:
    lo = rtnl.index("lo")
    rtnl.set_up(lo)
    rtnl.add_route("::", 0, oif=lo)  # `run`'s default route goes through the TUN
    rtnl.add_address(lo, "fd00:198:18::99", 128)  # local already: install must leave it be


@root
def test_routing_for_both_families_is_removed_exactly() -> None:
    async def scenario() -> None:
        ns = NetNs.new()
        try:
            await ns.acall(_prepare)
            before = await ns.acall(_state)
            addrs = [ipaddress.ip_address(a) for a in (POD, POD6, "fd00:198:18::99")]
            await ns.acall(delivery.install_routing, addrs)
            during = await ns.acall(_state)
            for piece in (f"inet6 {POD6}/128", f"inet {POD}/32", "table ip6 mirrord_ns_mirror",
                          "table ip mirrord_ns_mirror", "local default dev lo table 1836215923 proto 77 metric 1024"):
                assert piece in during, (piece, during)
            assert during.count("fwmark 0x6d726e73 lookup 1836215923") == 2  # ip rule and ip -6 rule
            await ns.acall(delivery.remove_routing)
            assert await ns.acall(_state) == before
            await ns.acall(delivery.remove_routing)  # idempotent: what attach does for leftovers
            assert await ns.acall(_state) == before
        finally:
            ns.close()

    asyncio.run(scenario())


# --- end to end
def _pod_state(sb: Sandbox) -> str:
    return sb.exec("pod", "sh", "-c", "ip rule; ip -6 rule; ip route show table all; ip -6 route show table all;"
                   " ip addr; nft list ruleset").stdout


@pytest.fixture(scope="module", name="sb")
def dual_stack_sandbox() -> Iterator[Sandbox]:
    box = Sandbox(ipv6=True)
    try:
        box.build()
        box.start_agent()
        box.start_ready("pod", [PY, "-m", "mirrord_tun.sandbox.http_server", "::", str(HTTP_PORT), "pod"])
        yield box
    finally:
        box.close()


def _agent_counters(log: str) -> dict[str, int]:
    m = re.search(r"^mirrord-ns: agent: (.*)$", log, re.M)
    assert m, log
    return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in m[1].split(", "))}


@root
def test_ipv6_posts_mirrored_with_the_client_address_next_to_ipv4(sb: Sandbox) -> None:
    # The pod's link-local address finishes DAD on its own a moment after the sandbox is made.
    assert wait_until(lambda: "tentative" not in _pod_state(sb), 30, 0.2)
    pod_before = _pod_state(sb)
    host6 = f"[{POD6}]"
    with Session(sb, "v6", recorder("tcp", HTTP_PORT, "--ipv6")) as s:
        s.wait_mirroring(host=host6)
        results = post(sb, 100, 10, 1024 * 1024, seed=61, host=host6)
        assert_pod_answered(results, CLIENT6)
        assert_all_mirrored(s, results, peer=CLIENT6)
        s.record.write_text("")  # the recorder appends: from here on, IPv4 alone
        results = post(sb, 40, 10, 1024 * 1024, seed=62)
        assert_pod_answered(results, MAPPED_CLIENT)  # the pod serves IPv4 on :: as well
        assert_all_mirrored(s, results, peer=MAPPED_CLIENT)
        out = sb.exec("client", PY, "-c", _EXT_CLIENT)
        assert out.stdout.strip() == "HTTP/1.1 200 OK", out.stderr  # the pod served it
        post(sb, 1, 1, 16, path="/probe", host=host6)  # a copy after the skipped ones: they came before
        assert wait_until(lambda: "/probe" in s.record.read_text(), 30, 0.2), s.log()
    assert all(r.get("path") != "/ext" for r in s.records()), s.log()
    # SYN, request and FIN at least; the pod's answers carry no extension header.
    skipped = _agent_counters(s.log()).get("mirror_skipped_ipv6_ext", 0)
    assert skipped >= 3, s.log()
    print(f"IPv6 mirror: 100 IPv6 and 40 IPv4 POSTs byte-identical; {skipped} packets with an extension header skipped")
    assert_nothing_given_up(s.log())
    assert_nothing_leaked(s.log())
    assert wait_until(lambda: _pod_state(sb) == pod_before, 30, 0.5), \
        "\n".join(difflib.unified_diff(pod_before.splitlines(), _pod_state(sb).splitlines(), lineterm=""))
