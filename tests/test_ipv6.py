"""IPv6 through the tunnel (issue 13), on a dual-stack sandbox (`Sandbox(ipv6=True)`, fd00:198:18::/64).

The command's TCP, UDP and ping over IPv6 reach svc as the pod's IPv6 address, names
resolve to AAAA records through the pod's resolver, which is itself an IPv6 nameserver,
and IPv4 keeps working beside it. From the attacker's side (the views of
tests/test_security_forward.py): a neighbour routing our IPv6 tunnel prefix via the pod,
the pod's own processes, and spoofed sources reach nothing; the pod's IPv6 settings are
exactly as before after a session and after the agent worker is killed. An IPv4-only
pod gives today's behaviour: no IPv6 in the command's namespace at all.
"""
from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import dpkt
import pytest
from conftest import (CLEAN_TIMEOUT, POD, SVC, Cluster, assert_clean, children, finish, kill_pids, leftovers,
                      make_cluster, mrd_run, read_line, run_argv, run_env, start_run, wait_until)

from test_attach import detach, in_app, make_app, snapshot, start_attach
from test_bad_input import VNET, Probe, in_laptop
from test_readonly_proc import READ_ONLY_PROC_SYS
from test_security_forward import ATTACK, PORT, Victim, attack, pod_sysctls, refused_at_each_end

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import TUNNEL_NET6
from mirrord_tun.protocol import ClientMsg
from mirrord_tun.sandbox import ADDRS6, RESOLV_CONF6, Sandbox

POD6, SVC6, NEIGHBOUR6 = ADDRS6["pod"], ADDRS6["svc"], ADDRS6["client"]
UDP_WHO_PORT = 7  # on svc's IPv6 address: answers each datagram with the sender's address

_UDP_WHO = f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("{SVC6}", {UDP_WHO_PORT}))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(peer[0].encode(), peer)
"""


class Victim6(Victim):
    svc = SVC6


def make_cluster6(agent_wrap: tuple[str, ...] = ()) -> Iterator[Cluster]:
    yield from make_cluster(agent_wrap, ipv6=True, more_on_svc=[sys.executable, "-c", _UDP_WHO])


@pytest.fixture(scope="module")
def cluster6() -> Iterator[Cluster]:
    yield from make_cluster6()


@pytest.fixture
def fresh_cluster6() -> Iterator[Cluster]:
    yield from make_cluster6()


def pod_sysctls6(sb: Sandbox) -> dict[str, str]:
    """Every net.ipv6.conf.*.* of the pod (TUNs left out), with test_security_forward's IPv4 ones."""
    script = ("import glob, json\n"
              "out = {}\n"
              "for p in sorted(glob.glob('/proc/sys/net/ipv6/conf/*/*')):\n"
              "    if '/conf/mrd' not in p:\n"
              "        try:\n"
              "            out[p] = open(p).read()\n"
              "        except OSError as e:\n"
              "            out[p] = type(e).__name__\n"
              "print(json.dumps(out))\n")
    r = sb.exec("pod", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    return {**pod_sysctls(sb), **json.loads(r.stdout)}


def assert_clean6(sb: Sandbox) -> None:
    """conftest's leftovers (links, tables of every family, IPv4 forwarding), and IPv6 forwarding."""
    def left() -> list[str]:
        knob = sb.exec("pod", "cat", "/proc/sys/net/ipv6/conf/eth0/force_forwarding").stdout.strip()
        return leftovers(sb) + ([] if knob == "0" else [f"eth0 force_forwarding={knob}"])
    wait_until(lambda: not left(), CLEAN_TIMEOUT)
    assert left() == []


def dropped(err: str) -> dict[str, int]:
    """What `run -v` counts as dropped at both ends: {"local": {...}, "agent": {...}}, zeros left out."""
    local = re.search(r"^mirrord-ns: local: .* dropped: (\{.*\}|none)$", err, re.M)
    agent = re.search(r"^mirrord-ns: agent: (.*)$", err, re.M)
    assert local and agent, f"no counters in run's output:\n{err}"
    stats = dict(pair.rsplit(" ", 1) for pair in agent[1].split(", "))
    return {"local": {} if local[1] == "none" else ast.literal_eval(local[1]),
            "agent": {k: int(v) for k, v in stats.items() if k.startswith("dropped_") and v != "0"}}


NOTHING_DROPPED = {"local": {}, "agent": {}}


# --- the command's IPv6 reaches the cluster as the pod

UDP_ASK = f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"who am I", ("{SVC6}", {UDP_WHO_PORT}))
print("udp", s.recv(100).decode())
"""


def test_tcp_udp_and_ping_over_ipv6_leave_as_the_pods_ipv6_address(cluster6: Cluster) -> None:
    sb = cluster6.sb
    script = (f"curl -sS -m 10 'http://[{SVC6}]/' && {sys.executable} -c '{UDP_ASK}' "
              f"&& ping -6 -c 1 -W 5 {SVC6} >/dev/null && echo ping6 ok "
              f"&& curl -sS -m 10 http://{SVC}/")  # IPv4 beside it, unchanged
    r = mrd_run(sb, "sh", "-c", script, verbose=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"hello from svc, you are {POD6}", f"udp {POD6}", "ping6 ok",
                                     f"hello from svc, you are {POD}"]
    assert dropped(r.stderr) == NOTHING_DROPPED, r.stderr
    assert_clean6(sb)


def test_bulk_over_ipv6_both_ways_arrives_intact(cluster6: Cluster) -> None:
    """TCP super-packets (GSO over IPv6) pass both ends' virtio checks, and nothing is dropped."""
    size = 32 << 20
    script = (f"curl -sS -m 60 -o /dev/null -w '%{{size_download}}\\n' 'http://[{SVC6}]/bytes/{size}' && "
              f"head -c {size} /dev/zero | curl -sS -m 60 --data-binary @- 'http://[{SVC6}]/'")
    sb = cluster6.sb
    r = mrd_run(sb, "sh", "-c", script, verbose=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(size), f"{hashlib.sha256(bytes(size)).hexdigest()} from {POD6}"]
    assert dropped(r.stderr) == NOTHING_DROPPED, r.stderr
    assert_clean6(sb)


def test_aaaa_and_a_through_the_pods_ipv6_nameserver(cluster6: Cluster) -> None:
    r = mrd_run(cluster6.sb, "sh", "-c", "cat /etc/resolv.conf; getent ahostsv6 svc; getent ahostsv4 svc; "
                "curl -sS -m 10 -6 http://svc/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(RESOLV_CONF6), r.stdout  # the only nameserver is an IPv6 address
    addrs = {line.split()[0] for line in r.stdout.splitlines() if "STREAM" in line}
    assert addrs == {SVC6, SVC}, r.stdout
    assert r.stdout.splitlines()[-1] == f"hello from svc, you are {POD6}"


@pytest.fixture
def narrow_path_to_svc6(cluster6: Cluster) -> Iterator[Sandbox]:
    """The pod reaches svc over IPv6 through a 1280-byte MTU: forwarding the command's full-size
    packets there, the pod's kernel answers Packet Too Big."""
    sb = cluster6.sb
    route = ["ip", "-n", sb.ns("pod"), "-6", "route"]
    subprocess.run([*route, "add", f"{SVC6}/128", "dev", "eth0", "mtu", "1280"], check=True)
    try:
        yield sb
    finally:
        subprocess.run([*route, "del", f"{SVC6}/128"], capture_output=True)


def test_icmpv6_errors_and_packet_too_big_reach_the_command(narrow_path_to_svc6: Sandbox) -> None:
    sb = narrow_path_to_svc6
    size = 4 << 20
    script = (f"ping -6 -c 1 -W 5 -t 1 {SVC6} | grep -o 'Time exceeded' ; "  # hop 1: the pod's end of the tunnel
              f"head -c {size} /dev/zero | curl -sS -m 30 --data-binary @- 'http://[{SVC6}]/' && "
              f"ip -6 route get {SVC6} | grep -o 'mtu 1280'")  # the path MTU the Packet Too Big taught
    r = mrd_run(sb, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Time exceeded", f"{hashlib.sha256(bytes(size)).hexdigest()} from {POD6}",
                                     "mtu 1280"], r.stdout
    assert_clean6(sb)


# --- nobody gets in, nothing is spoofed

@pytest.fixture
def neighbour_route6(cluster6: Cluster) -> Iterator[Sandbox]:
    """The hostile neighbour sends everything for our IPv6 tunnel prefix to the pod."""
    sb = cluster6.sb
    subprocess.run(["ip", "-n", sb.ns("client"), "-6", "route", "add", str(TUNNEL_NET6), "via", POD6], check=True)
    try:
        yield sb
    finally:
        subprocess.run(["ip", "-n", sb.ns("client"), "-6", "route", "del", str(TUNNEL_NET6)], capture_output=True)


@pytest.fixture
def victim6(cluster6: Cluster, tmp_path: Path) -> Iterator[Victim]:
    prog = Victim6(cluster6.sb, tmp_path)
    assert ipaddress.ip_address(prog.addr) in TUNNEL_NET6, prog.addr
    yield prog
    cluster6.sb.stop(prog.proc)


def test_a_neighbour_routing_our_ipv6_prefix_via_the_pod_reaches_nothing(
        neighbour_route6: Sandbox, victim6: Victim) -> None:
    sb, prog = neighbour_route6, victim6
    refused_at_each_end(prog, lambda: attack(sb, "client", prog.addr, prog.addr, prog.agent_addr))
    assert prog.finish() == []
    assert_clean6(sb)


def test_a_second_ipv6_session_works_and_cannot_reach_the_first(cluster6: Cluster, victim6: Victim) -> None:
    prog = victim6

    def attempt() -> list[str]:
        r = mrd_run(cluster6.sb, "sh", "-c", f"\"$@\" && curl -sS --max-time 10 'http://[{SVC6}]/'", "sh",
                    sys.executable, "-c", ATTACK, prog.addr, str(PORT), prog.addr, prog.agent_addr)
        assert r.returncode == 0, r.stderr
        *result, reply = r.stdout.splitlines()
        assert reply == f"hello from svc, you are {POD6}"  # the second session has IPv6 too
        return result

    refused_at_each_end(prog, attempt)
    assert prog.finish() == []
    assert_clean6(cluster6.sb)


def test_the_pods_own_processes_cannot_call_into_the_session_over_ipv6(cluster6: Cluster, victim6: Victim) -> None:
    refused_at_each_end(victim6, lambda: attack(cluster6.sb, "pod", victim6.addr, victim6.addr))
    assert victim6.finish() == []
    assert_clean6(cluster6.sb)


def test_the_pod_routes_no_ipv6_for_its_neighbours(cluster6: Cluster, victim6: Victim) -> None:
    """eth0's force_forwarding forwards only the sessions' replies.

    The neighbour ignores redirects: svc is on its own link, so the pod's kernel answers the
    first packet with a redirect to svc itself (as any IPv6 router does, before the filter
    that then drops the packet), and a neighbour that followed it would not test the pod."""
    sb = cluster6.sb
    client = sb.ns("client")
    knob = "net.ipv6.conf.eth0.accept_redirects"
    before = sb.exec("client", "sysctl", "-n", knob).stdout.strip()
    sb.exec("client", "sysctl", "-qw", f"{knob}=0")
    subprocess.run(["ip", "-n", client, "-6", "route", "add", f"{SVC6}/128", "via", POD6], check=True)
    try:
        r = sb.exec("client", "curl", "-sS", "--max-time", "5", f"http://[{SVC6}]/")
        assert r.returncode == 28, (r.returncode, r.stdout)  # timed out: the pod forwarded nothing
    finally:
        subprocess.run(["ip", "-n", client, "-6", "route", "del", f"{SVC6}/128"], capture_output=True)
        sb.exec("client", "sysctl", "-qw", f"{knob}={before}")
    assert victim6.finish() == []
    assert_clean6(sb)


def test_spoofed_ipv6_sources_from_the_command_are_dropped_and_counted(cluster6: Cluster) -> None:
    """The command (root in its namespace) gives the TUN another address: run drops what it sends."""
    spoofed = "fd00:198:18::99"
    script = (f"ip addr add {spoofed}/128 dev mrd0 nodad && "
              f"! ping -6 -c 2 -W 1 -I {spoofed} {SVC6} >/dev/null && ip addr del {spoofed}/128 dev mrd0 && "
              f"ping -6 -c 1 -W 5 {SVC6} >/dev/null && echo ok")
    r = mrd_run(cluster6.sb, "sh", "-c", script, verbose=True)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert dropped(r.stderr) == {"local": {"dropped_spoofed": 2}, "agent": {}}, r.stderr


def echo6(src: str, dst: str) -> bytes:
    icmp = dpkt.icmp6.ICMP6(type=dpkt.icmp6.ICMP6_ECHO_REQUEST, data=dpkt.icmp6.ICMP6.Echo(id=1, seq=1, data=b"x"))
    payload = bytes(icmp)
    ip6 = dpkt.ip6.IP6(src=ipaddress.IPv6Address(src).packed, dst=ipaddress.IPv6Address(dst).packed,
                       nxt=dpkt.ip.IP_PROTO_ICMP6, hlim=64, plen=len(payload), data=payload)
    return VNET + bytes(ip6)


def test_the_agent_drops_ipv6_packets_not_from_the_sessions_address(cluster6: Cluster) -> None:
    """A hostile client, past `run`'s own check: the pod's address, another session's, IPv4 still checked."""
    async def scenario() -> dict[str, Any]:
        probe = await Probe().open(cluster6.sb)
        try:
            welcome = await probe.hello()
            assert welcome.client_addr6 and welcome.pod_addrs6 == [POD6]
            other = str(ipaddress.ip_address(welcome.client_addr6) + 4)
            probe.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets(
                [echo6(POD6, SVC6), echo6(other, SVC6), echo6(welcome.client_addr6, SVC6)])))
            await probe.ping(welcome.client_addr, 0x4D54)  # IPv4 carries on beside it
            return await probe.stats()
        finally:
            await probe.close()

    stats = in_laptop(cluster6.sb, scenario)
    assert stats.get("dropped_spoofed") == 2 and "dropped_ipv6" not in stats, stats
    assert stats["packets_in"] == 2  # the session's own echo request and the IPv4 ping
    assert_clean6(cluster6.sb)


# --- the pod's IPv6 settings: exactly as before

def test_ipv6_sysctls_after_a_session_are_exactly_as_before(cluster6: Cluster) -> None:
    sb = cluster6.sb
    before = pod_sysctls6(sb)
    p = start_run(sb, "sh", "-c", f"curl -sS -m 10 'http://[{SVC6}]/' && echo up && sleep 30")
    assert read_line(p) == f"hello from svc, you are {POD6}\n"
    assert read_line(p) == "up\n"
    during = pod_sysctls6(sb)
    changed = {k for k in before if before[k] != during[k]}
    assert changed == {"/proc/sys/net/ipv4/conf/eth0/forwarding", "/proc/sys/net/ipv6/conf/eth0/force_forwarding"}, \
        changed
    sb.stop(p)
    assert_clean6(sb)
    assert pod_sysctls6(sb) == before


def test_ipv6_sysctls_after_a_killed_agent_worker_are_exactly_as_before(fresh_cluster6: Cluster) -> None:
    sb, guard = fresh_cluster6.sb, fresh_cluster6.agent
    before = pod_sysctls6(sb)
    [worker] = children(guard.pid)
    p = start_run(sb, "sh", "-c", f"curl -sS -m 10 'http://[{SVC6}]/' && sleep 60")
    assert read_line(p) == f"hello from svc, you are {POD6}\n"
    assert "table ip6 mirrord_ns_" in sb.exec("pod", "nft", "list", "tables").stdout
    kill_pids([worker])
    finish(p)
    guard.wait(CLEAN_TIMEOUT)  # the guard removes the worker's tables and exits
    assert leftovers(sb) == []
    assert pod_sysctls6(sb) == before


# --- where IPv6 cannot be carried: exactly today's behaviour

CONNECT6 = f"""
import errno, socket
try:
    socket.create_connection(("{SVC6}", 80), 10)
except OSError as e:
    print(errno.errorcode[e.errno])
"""
# Nothing of IPv6 in the command's namespace; connecting fails at once; IPv4 works.
NO_IPV6 = (f"ip -6 route; ip -6 addr show dev mrd0; cat /proc/sys/net/ipv6/conf/mrd0/disable_ipv6; "
           f"{sys.executable} -c '{CONNECT6}'; curl -sS -m 10 http://{SVC}/")
NO_IPV6_OUTPUT = ["1", "ENETUNREACH", f"hello from svc, you are {POD}"]


def test_an_ipv4_only_pod_gives_no_ipv6_to_the_command(cluster: Cluster) -> None:
    r = mrd_run(cluster.sb, "sh", "-c", NO_IPV6)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == NO_IPV6_OUTPUT, r.stdout
    assert "table ip6" not in cluster.sb.exec("pod", "nft", "list", "tables").stdout
    assert_clean(cluster.sb)


@pytest.fixture
def confined6() -> Iterator[Cluster]:
    yield from make_cluster6(agent_wrap=READ_ONLY_PROC_SYS)


def test_without_per_device_ipv6_forwarding_the_session_is_ipv4_only(confined6: Cluster) -> None:
    """A read-only /proc/sys (as where force_forwarding does not exist): no IPv6, no global switch."""
    sb = confined6.sb
    before = pod_sysctls6(sb)
    r = mrd_run(sb, "sh", "-c", NO_IPV6)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == NO_IPV6_OUTPUT, r.stdout
    # Said once, with the agent's reason, so nobody wonders where IPv6 went.
    said = [l for l in r.stderr.splitlines() if "IPv4 only" in l]
    assert len(said) == 1 and "read-only" in said[0] and "--privileged" in said[0], r.stderr
    assert_clean6(sb)
    assert pod_sysctls6(sb) == before


@pytest.fixture
def app6(cluster6: Cluster) -> Iterator[str]:
    yield from make_app(cluster6.sb)


def test_attach_routes_ipv6_through_the_tunnel_and_restores_the_namespace(cluster6: Cluster, app6: str) -> None:
    """attach on a dual-stack pod: ::/1 and 8000::/1 beside the IPv4 halves, so the namespace's more
    specific IPv6 routes stay in force; afterwards addresses, routes, rules and nft exactly as before."""
    before = snapshot(app6)
    assert in_app(app6, "curl", "-sS", "-m", "2", "-g", f"http://[{SVC6}]/").returncode != 0  # no way there alone
    p = start_attach(cluster6.sb, app6)
    routes6 = subprocess.run(["ip", "-n", app6, "-6", "route"], capture_output=True, text=True).stdout
    assert re.search(r"^::/1 dev mrd\S+ proto 77", routes6, re.M) and re.search(r"^8000::/1 dev", routes6, re.M), \
        routes6
    curl = in_app(app6, "curl", "-sS", "-m", "10", "-g", f"http://[{SVC6}]/")
    assert curl.stdout == f"hello from svc, you are {POD6}\n", curl.stderr
    assert in_app(app6, "curl", "-sS", "-m", "10", f"http://{SVC}/").stdout == f"hello from svc, you are {POD}\n"
    assert detach(p) == 0
    assert snapshot(app6) == before
    assert_clean6(cluster6.sb)


def test_the_agent_is_reached_over_ipv6(cluster6: Cluster) -> None:
    """--listen [IPV6]:PORT and --agent [IPV6]:PORT; run from a cluster host, since the laptop's
    path to the node is IPv4 only."""
    sb = cluster6.sb
    listen = f"[{ADDRS6['node']}]:2223"
    agent = sb.start_agent(listen=listen)
    try:
        argv = run_argv(sb, "curl", "-sS", "-m", "10", f"http://{SVC}/", agent=listen)
        argv[argv.index(sb.ns("laptop"))] = sb.ns("client")
        r = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
        assert (r.returncode, r.stdout) == (0, f"hello from svc, you are {POD}\n"), r.stderr
    finally:
        sb.stop(agent)
    assert_clean6(sb)
