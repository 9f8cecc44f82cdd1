"""No open forwarding: nobody without the key opens a connection to the laptop through the pod.

Written from the attacker's side (issue 8, item 1). The victim is a program under
`mirrord-ns run` that listens on TCP and UDP at its tunnel address and records, with
a raw ICMP socket too, every connection, datagram and echo request that reaches it.
The attackers: a neighbour of the pod that routes 100.64.0.0/10 via the pod, a second
session on the same agent, the pod's own processes, and a container in the pod
that deletes the agent's nft table. None of them reaches the program, and the pod's
sysctls are exactly as before once the session is gone, however it ended.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import (CLEAN_TIMEOUT, POD, SVC, Cluster, assert_clean, children, finish, kill_pids, leftovers,
                      mrd_run, read_line, start_run)

from test_attach import app, detach, start_attach  # noqa: F401 - `app` is a fixture

from mirrord_tun.agent import dataplane
from mirrord_tun.agent.guard import sweep
from mirrord_tun.netns import links
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.sandbox import ADDRS, Sandbox

PORT = 7070
NEIGHBOUR = ADDRS["client"]
TUNNEL_NET = "100.64.0.0/10"

# The victim: reports "ready <tunnel address> <pid>", then records what reaches it until `done`
# exists. Its family is that of `svc` (the address it probes to learn its own).
VICTIM = f"""
import os, select, socket, sys
done, svc = sys.argv[1], sys.argv[2]
six = ":" in svc
family = socket.AF_INET6 if six else socket.AF_INET
probe = socket.socket(family, socket.SOCK_DGRAM)
probe.connect((svc, 9))
me = probe.getsockname()[0]
anywhere = "::" if six else "0.0.0.0"
tcp = socket.socket(family)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((anywhere, {PORT}))
tcp.listen(16)
udp = socket.socket(family, socket.SOCK_DGRAM)
udp.bind((anywhere, {PORT}))
icmp = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
print("ready", me, os.getpid(), flush=True)
while not os.path.exists(done):
    for s in select.select([tcp, udp, icmp], [], [], 0.1)[0]:
        if s is tcp:
            conn, peer = tcp.accept()
            print("tcp", peer[0], flush=True)
            conn.close()
        elif s is udp:
            print("udp", udp.recvfrom(65535)[1][0], flush=True)
        else:
            packet, peer = icmp.recvfrom(65535)
            # an echo request (the raw IPv4 socket gets the IP header too): someone pinged us
            if (packet[0] == 128) if six else (packet[(packet[0] & 15) * 4] == 8):
                print("ping", peer[0], flush=True)
print("end", flush=True)
"""

# The attack: connect, send, ping; prints one line per attempt, "reached" where it got through.
ATTACK = """
import socket, subprocess, sys
target, port, *pings = sys.argv[1:]
family = socket.AF_INET6 if ":" in target else socket.AF_INET
s = socket.socket(family)
s.settimeout(3)
try:
    s.connect((target, int(port)))
    print("tcp reached")
except OSError as e:
    print("tcp", type(e).__name__)
u = socket.socket(family, socket.SOCK_DGRAM)
try:
    for _ in range(3):
        u.sendto(b"let me in", (target, int(port)))
    print("udp sent")
except OSError as e:  # refused on the way out (the pod's own output chain)
    print("udp", type(e).__name__)
for addr in pings:
    r = subprocess.run(["busybox", "ping", "-c", "2", "-W", "2", addr], capture_output=True, text=True)
    print("ping", addr, "reached" if r.returncode == 0 else "no reply")
"""


class Victim:
    """A program listening at its tunnel address, under `run` or in the namespace `role` (attached);
    `finish()` returns what reached it."""

    svc = SVC  # tests/test_ipv6.py's victim listens on IPv6 instead

    def __init__(self, sb: Sandbox, tmp: Path, role: str | None = None) -> None:
        self.sb = sb
        self.done = tmp / f"done-{os.urandom(4).hex()}"
        argv = [sys.executable, "-c", VICTIM, str(self.done), self.svc]
        self.proc = start_run(sb, *argv) if role is None else \
            sb.start(role, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = read_line(self.proc)
        assert line.startswith("ready "), f"{line!r} {finish(self.proc)}"
        _, addr, pid = line.split()
        self.addr, self.pid = addr, int(pid)
        self.agent_addr = str(ipaddress.ip_address(addr) - 1)  # the /30's .1, the agent's end

    def drop_own_guard(self) -> None:
        """Delete the guard in the program's namespace, so that what follows tests the pod's end alone."""
        in_ns = ["nsenter", f"--net=/proc/{self.pid}/ns/net", "nft"]
        tables = subprocess.run([*in_ns, "list", "tables"], capture_output=True, text=True, check=True).stdout
        assert "table inet mirrord_ns_inbound" in tables
        subprocess.run([*in_ns, "delete", "table", "inet", "mirrord_ns_inbound"], check=True)

    def finish(self) -> list[str]:
        self.done.touch()
        code, out, err = finish(self.proc)
        assert code == 0 and out.splitlines()[-1:] == ["end"], f"exit {code}: {out}\n{err}"
        return out.splitlines()[:-1]


MakeVictim = Callable[..., Victim]


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[MakeVictim]:
    """Makes victims (`victim(sb)`, `victim(sb, role="app")`); stops those a failed test left running."""
    made: list[Victim] = []

    def make(sb: Sandbox, role: str | None = None) -> Victim:
        made.append(Victim(sb, tmp_path, role))
        return made[-1]

    yield make
    for v in made:
        v.sb.stop(v.proc)


def attack(sb: Sandbox, role: str, target: str, *pings: str) -> list[str]:
    r = sb.exec(role, sys.executable, "-c", ATTACK, target, str(PORT), *pings)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def refused(result: list[str]) -> bool:
    return not any("reached" in line for line in result) and any(line.startswith("udp ") for line in result)


def refused_at_each_end(prog: Victim, attempt: Callable[[], list[str]]) -> None:
    """`attempt` fails with both ends guarding, and again with the pod's end alone."""
    result = attempt()
    assert refused(result), result
    prog.drop_own_guard()
    result = attempt()
    assert refused(result), f"the pod's end alone let it through: {result}"


@pytest.fixture
def neighbour_route(cluster: Cluster) -> Iterator[Sandbox]:
    yield from _route_via_pod(cluster.sb)


@pytest.fixture
def fresh_neighbour_route(fresh_cluster: Cluster) -> Iterator[Sandbox]:
    yield from _route_via_pod(fresh_cluster.sb)


def _route_via_pod(sb: Sandbox) -> Iterator[Sandbox]:
    """The hostile neighbour sends everything for the tunnel network to the pod."""
    subprocess.run(["ip", "-n", sb.ns("client"), "route", "add", TUNNEL_NET, "via", POD], check=True)
    try:
        yield sb
    finally:
        subprocess.run(["ip", "-n", sb.ns("client"), "route", "del", TUNNEL_NET], capture_output=True)


# --- attackers

def test_a_neighbour_routing_via_the_pod_reaches_nothing(neighbour_route: Sandbox, victim: MakeVictim) -> None:
    sb = neighbour_route
    prog = victim(sb)
    refused_at_each_end(prog, lambda: attack(sb, "client", prog.addr, prog.addr, prog.agent_addr))
    assert prog.finish() == []
    assert_clean(sb)


def test_a_second_session_cannot_reach_the_first(cluster: Cluster, victim: MakeVictim) -> None:
    sb = cluster.sb
    prog = victim(sb)
    # The other session's own tunnel works (it reaches svc), and nothing of the first one.

    def attempt() -> list[str]:
        r = mrd_run(sb, "sh", "-c", f'"$@" && curl -sS --max-time 10 http://{SVC}/', "sh",
                    sys.executable, "-c", ATTACK, prog.addr, str(PORT), prog.addr, prog.agent_addr)
        assert r.returncode == 0, r.stderr
        *result, reply = r.stdout.splitlines()
        assert reply == f"hello from svc, you are {POD}"
        return result

    refused_at_each_end(prog, attempt)
    assert prog.finish() == []
    assert_clean(sb)


def test_the_pods_own_processes_cannot_call_into_the_session(cluster: Cluster, victim: MakeVictim) -> None:
    sb = cluster.sb
    prog = victim(sb)
    refused_at_each_end(prog, lambda: attack(sb, "pod", prog.addr, prog.addr))
    assert prog.finish() == []
    assert_clean(sb)


def test_a_container_that_deletes_the_agents_table_still_reaches_nothing(
        fresh_neighbour_route: Sandbox, victim: MakeVictim) -> None:
    """NET_ADMIN in the pod removes the pod's guard; `run`'s own namespace still refuses.

    Then the test removes that one too, and the same attack gets through: the
    attack is real, and it is the namespace's own guard that stopped it.
    """
    sb = fresh_neighbour_route
    prog = victim(sb)
    tables = [line.split()[-1] for line in sb.exec("pod", "nft", "list", "tables").stdout.splitlines()
              if "mirrord_ns_" in line]
    assert tables
    for table in tables:
        assert sb.exec("pod", "nft", "delete", "table", "ip", table).returncode == 0
    assert refused(attack(sb, "client", prog.addr))
    prog.drop_own_guard()
    assert "tcp reached" in attack(sb, "client", prog.addr)
    assert f"tcp {NEIGHBOUR}" in prog.finish()
    # The table was gone, yet the session put forwarding back when it ended.
    assert_clean(sb)


def test_an_attached_namespace_refuses_what_the_pods_end_lets_through(
        neighbour_route: Sandbox, app: str, victim: MakeVictim) -> None:
    """attach: its own guard holds even with the pod's table deleted, and goes with the detach."""
    sb = neighbour_route
    p = start_attach(sb, app)
    try:
        prog = victim(sb, role="app")
        for line in sb.exec("pod", "nft", "list", "tables").stdout.splitlines():
            if "mirrord_ns_" in line:
                assert sb.exec("pod", "nft", "delete", "table", "ip", line.split()[-1]).returncode == 0
        result = attack(sb, "client", prog.addr, prog.addr)
        assert refused(result), result
        assert prog.finish() == []
    finally:
        assert detach(p) == 0
    assert "mirrord_ns_inbound" not in subprocess.run(["ip", "netns", "exec", app, "nft", "list", "tables"],
                                                      capture_output=True, text=True, check=True).stdout
    assert_clean(sb)


# --- what must keep working

def test_the_session_itself_reaches_the_pod_and_traceroute_works(cluster: Cluster) -> None:
    """Own agent-side address and the pod answer; ICMP errors from the pod (traceroute) come back."""
    script = ("a=$(ip -4 -o addr show dev mrd0 | awk '{print $4}' | cut -d/ -f1); "
              "agent=$(echo $a | awk -F. '{print $1\".\"$2\".\"$3\".\"$4-1}'); "
              f"busybox ping -c 1 -W 5 $agent >/dev/null && busybox ping -c 1 -W 5 {POD} >/dev/null && "
              f"busybox traceroute -n -q 1 -w 5 -m 3 {SVC} 2>/dev/null")
    r = mrd_run(cluster.sb, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    hops = [line.split()[:2] for line in r.stdout.splitlines() if not line.startswith("traceroute")]
    # Hop 1 is the pod's end of the tunnel (its TTL-exceeded came back), hop 2 svc itself.
    assert [h[0] for h in hops] == ["1", "2"], r.stdout
    assert ipaddress.ip_address(hops[0][1]) in ipaddress.ip_network(TUNNEL_NET) and hops[1][1] == SVC, r.stdout
    assert_clean(cluster.sb)


# --- sysctls: exactly as before

IPV4_SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/*/*")


def pod_sysctls(sb: Sandbox, patterns: tuple[str, ...] = IPV4_SYSCTLS) -> dict[str, str]:
    """The pod namespace's sysctls matching `patterns` (TUNs left out)."""
    script = ("import glob, json, sys\n"
              "out = {}\n"
              "for p in sorted({q for pattern in sys.argv[1:] for q in glob.glob(pattern)}):\n"
              "    if '/conf/mrd' not in p:\n"
              "        try:\n"
              "            out[p] = open(p).read()\n"
              "        except OSError as e:\n"
              "            out[p] = type(e).__name__\n"
              "print(json.dumps(out))\n")
    r = sb.exec("pod", sys.executable, "-c", script, *patterns)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def hardened_pod(cluster: Cluster) -> Iterator[Sandbox]:
    """A pod that turned redirects off, as hardening guides say: the state writing ip_forward loses."""
    sb = cluster.sb
    knob = "net.ipv4.conf.all.accept_redirects"
    before = sb.exec("pod", "sysctl", "-n", knob).stdout.strip()
    sb.exec("pod", "sysctl", "-w", f"{knob}=0")
    try:
        yield sb
    finally:
        sb.exec("pod", "sysctl", "-w", f"{knob}={before}")


def test_sysctls_after_a_session_are_exactly_as_before(hardened_pod: Sandbox) -> None:
    sb = hardened_pod
    before = pod_sysctls(sb)
    p = start_run(sb, "sh", "-c", f"curl -sS -m 10 http://{SVC}/ && busybox ping -c 1 -W 5 {SVC} >/dev/null "
                  "&& echo up && sleep 30")
    assert read_line(p) == f"hello from svc, you are {POD}\n"
    assert read_line(p) == "up\n"
    during = pod_sysctls(sb)
    # Forwarding is per device: the sysctl and every other setting stay as they were.
    changed = {k for k in before if before[k] != during[k]}
    assert changed == {"/proc/sys/net/ipv4/conf/eth0/forwarding"}, changed
    sb.stop(p)
    assert_clean(sb)
    assert pod_sysctls(sb) == before


def test_sysctls_after_a_killed_agent_worker_are_exactly_as_before(fresh_cluster: Cluster) -> None:
    sb, guard = fresh_cluster.sb, fresh_cluster.agent
    before = pod_sysctls(sb)
    [worker] = children(guard.pid)
    p = start_run(sb, "sh", "-c", "echo up; sleep 60")
    assert read_line(p) == "up\n"
    assert pod_sysctls(sb) != before
    kill_pids([worker])
    finish(p)
    guard.wait(CLEAN_TIMEOUT)  # the guard removes the worker's tables and exits
    assert leftovers(sb) == []
    assert pod_sysctls(sb) == before


def test_the_pod_routes_nothing_else_for_its_neighbours(cluster: Cluster, victim: MakeVictim) -> None:
    """The links forwarding was switched on for forward only the sessions' replies."""
    sb = cluster.sb
    client = sb.ns("client")
    subprocess.run(["ip", "-n", client, "route", "add", f"{SVC}/32", "via", POD], check=True)
    try:
        prog = victim(sb)  # a session: forwarding is on in the pod
        r = sb.exec("client", "curl", "-sS", "--max-time", "5", f"http://{SVC}/")
        assert r.returncode == 28, (r.returncode, r.stdout)  # timed out: the pod forwarded nothing
        assert prog.finish() == []
    finally:
        subprocess.run(["ip", "-n", client, "route", "del", f"{SVC}/32"], capture_output=True)
    assert_clean(sb)


def test_an_older_agents_leftovers_are_undone_with_what_ip_forward_changed(cluster: Cluster) -> None:
    """Older agents set net.ipv4.ip_forward (which also turns conf.all.accept_redirects off) and
    recorded `fwd=0`; whoever removes the last such table writes it back, and the kernel's side
    effects go back with it."""
    sb = cluster.sb
    before = pod_sysctls(sb)
    table = "mirrord_ns_0dd0a9e7"
    try:
        # What such an agent left when it was killed: no process 4194305 can exist (above pid_max).
        sb.exec("pod", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        r = sb.exec("pod", "nft", "-f", "-", input=f'table ip {table} {{ comment "owner=4194305:0 fwd=0 dev=" ; }}\n')
        assert r.returncode == 0, r.stderr
        assert pod_sysctls(sb) != before
        assert sweep(sb.netns_path("pod")) == [table]
        assert pod_sysctls(sb) == before
    finally:
        sb.exec("pod", "nft", "delete", "table", "ip", table)
        sb.exec("pod", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    assert_clean(sb)


def test_tunnel_addresses_stay_clear_of_a_pod_network_numbered_from_the_same_range(private_ns: NetNs) -> None:
    """A cluster whose pods are 100.66.x.x (EKS custom networking, GKE): the pod sees only its own
    address, its neighbours are behind the default route. A /30 of ours among them would take a
    teammate's traffic to one of them into our TUN; none is ever picked within the pod's /14."""
    def setup() -> None:
        subprocess.run(["ip", "tuntap", "add", "eth0", "mode", "tun"], check=True)
        subprocess.run(["ip", "addr", "add", "100.66.23.45/32", "dev", "eth0"], check=True)
        subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "route", "add", "default", "dev", "eth0"], check=True)

    private_ns.call(setup)
    own = private_ns.call(lambda: links.ipv4_addresses(exclude_prefix=dataplane.TUN_PREFIX))
    assert own == ["100.66.23.45"]
    picked = private_ns.call(lambda: [dataplane._free_block(own) for _ in range(2000)])
    pods = ipaddress.ip_network("100.64.0.0/14")
    assert not [b for b in picked if b.overlaps(pods)]
    assert len(set(picked)) > 1900  # still random over the rest of the range
