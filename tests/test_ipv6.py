"""IPv6 through the tunnel (issue 13), on a dual-stack sandbox (`Sandbox(ipv6=True)`, fd00:198:18::/64).

The command's TCP, UDP and ping over IPv6 reach svc as the pod's IPv6 address, names
resolve to AAAA records through the pod's resolver, which is itself an IPv6 nameserver,
and IPv4 keeps working beside it. From the attacker's side (the views of
tests/test_security_forward.py): a neighbour routing our IPv6 tunnel prefix via the pod,
the pod's own processes, and spoofed sources reach nothing; the pod's IPv6 settings are
exactly as before after a session and after the agent worker is killed. An IPv4-only
pod gives today's behaviour: no IPv6 in the command's namespace at all.

The agent's `--ipv6-forwarding global` (what `auto` picks on kernels before 6.17, which lack
force_forwarding) runs the forwarding-sensitive tests too (BOTH_MODES): it switches
net.ipv6.conf.all.forwarding, so every link forwards while a session runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import dpkt
import pytest
from conftest import (CLEAN_TIMEOUT, POD, SVC, Cluster, assert_clean, children, finish, kill_pids, leftovers,
                      local_dropped, make_cluster, mrd_run, read_line, run_argv, run_env, start_run, wait_until)

from test_attach import detach, in_app, make_app, snapshot, start_attach
from test_bad_input import VNET, Probe, in_laptop
from test_readonly_proc import READ_ONLY_PROC_SYS
from test_security_forward import IPV4_SYSCTLS, ATTACK, PORT, Victim, attack, pod_sysctls, refused_at_each_end

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import TUNNEL_NET6
from mirrord_tun.netns.ipv6 import forwarding_method, has_force_forwarding
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


def make_cluster6(agent_wrap: tuple[str, ...] = (), forwarding: str = "auto") -> Iterator[Cluster]:
    """`forwarding`: the agent's --ipv6-forwarding."""
    yield from make_cluster(agent_wrap, ipv6=True, more_on_svc=[sys.executable, "-c", _UDP_WHO],
                            agent_args=("--ipv6-forwarding", forwarding))


# The param is the agent's --ipv6-forwarding; BOTH_MODES runs a test with global as well.
@pytest.fixture(scope="module", params=["auto"])
def cluster6(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from make_cluster6(forwarding=request.param)


@pytest.fixture(params=["auto"])
def fresh_cluster6(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from make_cluster6(forwarding=request.param)


BOTH_MODES = pytest.mark.parametrize("cluster6", ["auto", "global"], indirect=True)
BOTH_MODES_FRESH = pytest.mark.parametrize("fresh_cluster6", ["auto", "global"], indirect=True)


def pod_sysctls6(sb: Sandbox) -> dict[str, str]:
    """Every net.ipv6.conf.*.* of the pod (TUNs left out), with test_security_forward's IPv4 ones."""
    return pod_sysctls(sb, (*IPV4_SYSCTLS, "/proc/sys/net/ipv6/conf/*/*"))


def assert_clean6(sb: Sandbox) -> None:
    """conftest's leftovers (links, tables of every family, IPv4 forwarding), and IPv6 forwarding."""
    knobs = ["all/forwarding", *(["eth0/force_forwarding"] if has_force_forwarding() else [])]

    def left() -> list[str]:
        values = {k: sb.exec("pod", "cat", f"/proc/sys/net/ipv6/conf/{k}").stdout.strip() for k in knobs}
        return leftovers(sb) + [f"{k}={v}" for k, v in values.items() if v != "0"]
    wait_until(lambda: not left(), CLEAN_TIMEOUT)
    assert left() == []


def dropped(err: str) -> dict[str, int]:
    """What `run -v` counts as dropped at both ends: {"local": {...}, "agent": {...}}, zeros left out."""
    agent = re.search(r"^mirrord-ns: agent: (.*)$", err, re.M)
    assert agent, f"no counters in run's output:\n{err}"
    stats = dict(pair.rsplit(" ", 1) for pair in agent[1].split(", "))
    return {"local": local_dropped(err),
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


@BOTH_MODES
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


@BOTH_MODES
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


NEW_LINK_POD6, NEW_LINK_CLIENT6 = "fd00:1::1", "fd00:1::2"


@contextlib.contextmanager
def neighbour_routes_svc6_via_pod(sb: Sandbox, new_link: bool) -> Iterator[None]:
    """The neighbour sends what it has for svc's IPv6 address to the pod: over the cluster network
    (ignoring redirects: svc is on the same link, so the pod's kernel answers the first packet with
    a redirect to svc itself, as any IPv6 router does before the filter that then drops the packet,
    and a neighbour that followed it would not test the pod), or over a link of its own to the pod,
    made now (after the session started, so in no list of the agent's), svc answering it directly."""
    client = sb.ns("client")
    knob = "net.ipv6.conf.eth0.accept_redirects"
    before = sb.exec("client", "sysctl", "-n", knob).stdout.strip()
    try:
        if new_link:
            subprocess.run(["ip", "-n", sb.ns("pod"), "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
                            "netns", client], check=True)
            for ns, addr in ((sb.ns("pod"), NEW_LINK_POD6), (client, NEW_LINK_CLIENT6)):
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", "eth1", "nodad"], check=True)
                subprocess.run(["ip", "-n", ns, "link", "set", "eth1", "up"], check=True)
            ping = sb.exec("client", "ping", "-6", "-c", "1", "-W", "5", NEW_LINK_POD6)
            assert ping.returncode == 0, ping.stdout  # the link works; what follows tests forwarding alone
            route = ["via", NEW_LINK_POD6, "dev", "eth1", "src", NEIGHBOUR6]
        else:
            sb.exec("client", "sysctl", "-qw", f"{knob}=0")
            route = ["via", POD6]
        subprocess.run(["ip", "-n", client, "-6", "route", "add", f"{SVC6}/128", *route], check=True)
        yield
    finally:
        subprocess.run(["ip", "-n", client, "-6", "route", "del", f"{SVC6}/128"], capture_output=True)
        subprocess.run(["ip", "-n", sb.ns("pod"), "link", "del", "eth1"], capture_output=True)
        sb.exec("client", "sysctl", "-qw", f"{knob}={before}")


@BOTH_MODES
@pytest.mark.parametrize("new_link", [False, True], ids=["eth0", "new-link"])
def test_the_pod_routes_no_ipv6_for_its_neighbours(cluster6: Cluster, victim6: Victim, new_link: bool) -> None:
    """The links forwarding is switched on for (eth0's force_forwarding, or with global every link,
    also one that appears during the session) forward only the sessions' replies."""
    sb = cluster6.sb
    with neighbour_routes_svc6_via_pod(sb, new_link):
        r = sb.exec("client", "curl", "-sS", "--max-time", "5", f"http://[{SVC6}]/")
        assert r.returncode == 28, (r.returncode, r.stdout)  # timed out: the pod forwarded nothing
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

_CONF6 = "/proc/sys/net/ipv6/conf"
# What a session changes on a pod_with_router_settings, by the method the agent's
# --ipv6-forwarding comes to on this kernel.
CHANGED_DURING = {
    "device": {"/proc/sys/net/ipv4/conf/eth0/forwarding": "1\n", f"{_CONF6}/eth0/force_forwarding": "1\n"},
    # Every link forwards (lo did already); accept_ra=1 is ignored where forwarding is on, 2 keeps
    # router advertisements working. Links that appear meanwhile inherit default, which stays.
    "global": {"/proc/sys/net/ipv4/conf/eth0/forwarding": "1\n", f"{_CONF6}/all/forwarding": "1\n",
               f"{_CONF6}/eth0/forwarding": "1\n", f"{_CONF6}/eth0/accept_ra": "2\n"},
}


@contextlib.contextmanager
def pod_with_router_settings(sb: Sandbox) -> Iterator[None]:
    """The pod accepts router advertisements (accept_ra=1, whatever the sandbox had) and lo
    forwards of its own, which writing all.forwarding=0 after a global session would reset."""
    knobs = {"net.ipv6.conf.eth0.accept_ra": "1", "net.ipv6.conf.default.accept_ra": "1",
             "net.ipv6.conf.lo.forwarding": "1"}
    before = {k: sb.exec("pod", "sysctl", "-n", k).stdout.strip() for k in knobs}
    try:
        for k, v in knobs.items():
            sb.exec("pod", "sysctl", "-qw", f"{k}={v}")
        yield
    finally:
        for k, v in before.items():
            sb.exec("pod", "sysctl", "-qw", f"{k}={v}")


def assert_changed_during(before: dict[str, str], during: dict[str, str], mode: str) -> None:
    method = forwarding_method(mode, has_force_forwarding())  # auto is global before Linux 6.17
    assert method is not None
    assert {k: v for k, v in during.items() if before[k] != v} == CHANGED_DURING[method]


@BOTH_MODES
def test_ipv6_sysctls_after_a_session_are_exactly_as_before(cluster6: Cluster, request: pytest.FixtureRequest) -> None:
    sb = cluster6.sb
    with pod_with_router_settings(sb):
        before = pod_sysctls6(sb)
        p = start_run(sb, "sh", "-c", f"r=$(curl -sS -m 10 'http://[{SVC6}]/') && echo \"$r, up\" && sleep 30")
        assert read_line(p) == f"hello from svc, you are {POD6}, up\n"
        assert_changed_during(before, pod_sysctls6(sb), request.node.callspec.params["cluster6"])
        sb.stop(p)
        assert_clean6(sb)
        assert pod_sysctls6(sb) == before


@BOTH_MODES_FRESH
def test_ipv6_sysctls_after_a_killed_agent_worker_are_exactly_as_before(
        fresh_cluster6: Cluster, request: pytest.FixtureRequest) -> None:
    sb, guard = fresh_cluster6.sb, fresh_cluster6.agent
    with pod_with_router_settings(sb):
        before = pod_sysctls6(sb)
        [worker] = children(guard.pid)
        p = start_run(sb, "sh", "-c", f"curl -sS -m 10 'http://[{SVC6}]/' && sleep 60")
        assert read_line(p) == f"hello from svc, you are {POD6}\n"
        assert "table ip6 mirrord_ns_" in sb.exec("pod", "nft", "list", "tables").stdout
        assert_changed_during(before, pod_sysctls6(sb), request.node.callspec.params["fresh_cluster6"])
        kill_pids([worker])
        finish(p)
        guard.wait(CLEAN_TIMEOUT)  # the guard removes the worker's tables, restores, and exits
        assert leftovers(sb) == []
        assert pod_sysctls6(sb) == before


@pytest.mark.parametrize(("mode", "has_force_forwarding", "method"), [
    ("auto", True, "device"), ("auto", False, "global"), ("device", True, "device"), ("device", False, None),
    ("global", True, "global"), ("global", False, "global"), ("off", True, None), ("off", False, None)])
def test_how_each_mode_switches_ipv6_forwarding_on(mode: str, has_force_forwarding: bool, method: str | None) -> None:
    """auto is per device where the kernel has force_forwarding (6.17+), else the global switch."""
    assert forwarding_method(mode, has_force_forwarding) == method


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


# An agent that cannot or must not switch IPv6 forwarding on: its confinement, --ipv6-forwarding,
# and what the one line `run` prints about it says.
IPV4_ONLY_AGENTS = {
    "read-only-auto": (READ_ONLY_PROC_SYS, "auto", ["read-only", "--privileged"]),
    "read-only-global": (READ_ONLY_PROC_SYS, "global", ["read-only", "--privileged"]),
    "off": ((), "off", ["--ipv6-forwarding off"]),
}


@pytest.fixture(params=list(IPV4_ONLY_AGENTS.values()), ids=list(IPV4_ONLY_AGENTS))
def ipv4_only_agent(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, list[str]]]:
    wrap, forwarding, said = request.param
    for cluster in make_cluster6(wrap, forwarding):
        yield cluster, said


def test_where_ipv6_forwarding_cannot_be_switched_on_the_session_is_ipv4_only(
        ipv4_only_agent: tuple[Cluster, list[str]]) -> None:
    """A read-only /proc/sys (in either mode) or --ipv6-forwarding off: no IPv6, nothing touched."""
    cluster, reason = ipv4_only_agent
    sb = cluster.sb
    before = pod_sysctls6(sb)
    r = mrd_run(sb, "sh", "-c", NO_IPV6)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == NO_IPV6_OUTPUT, r.stdout
    # Said once, with the agent's reason, so nobody wonders where IPv6 went.
    said = [l for l in r.stderr.splitlines() if "IPv4 only" in l]
    assert len(said) == 1 and all(words in said[0] for words in reason), r.stderr
    assert_clean6(sb)
    assert pod_sysctls6(sb) == before


def test_an_ipv4_only_session_sends_nothing_of_ipv6_into_the_tunnel(
        ipv4_only_agent: tuple[Cluster, list[str]]) -> None:
    """The agent's TUN never gets an IPv6 link-local address, also where /proc/sys is read-only
    and its IPv6 cannot be switched off: the kernel sent a router solicitation from it into
    every IPv4-only session of an unprivileged agent (seen in a real cluster)."""
    cluster, _ = ipv4_only_agent
    run = start_run(cluster.sb, "sh", "-c", "echo up && sleep 30")
    assert read_line(run) == "up\n"
    addresses = cluster.sb.exec("pod", "ip", "-6", "-o", "addr", "show").stdout
    assert not [line for line in addresses.splitlines() if line.split()[1].startswith("mrd")], addresses
    cluster.sb.stop(run)


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
