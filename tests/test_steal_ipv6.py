"""Steal over IPv6 (issue 13), on a dual-stack sandbox (`Sandbox(ipv6=True)`, fd00:198:18::/64).

The pod (fd00:198:18::10 and 198.18.0.10) serves HTTP on 80 and 8080 and echoes UDP on
7 on both families. The program under `run --steal` listens on `::` (both families,
IPv4 clients seen as ::ffff:198.18.0.30) and says who served and which client address it
saw. IPv6 clients of the pod are stolen, with their own address, beside IPv4 ones;
excluded IPv6 sources keep the pod; the port comes back for IPv6 clients after every
kind of ending, the dead-man switch included; a hostile pod end reaches only the stolen
port over IPv6 too; filtered (HTTP) steal works for IPv6 clients. Give-back times are
printed (run with -s); the only bounds are liveness bounds.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from typing import Iterator

import pytest
from conftest import UDP_ECHO_PORT, leftovers, wait_until
from test_steal import (HTTP, HTTP_SERVER, LIVENESS, OTHER_PORT, Agent, Run, agent, get,  # noqa: F401 - fixtures
                        given_back_after, kill_every_agent_process, only_the_stolen_port_enters,
                        reset_when_the_session_dies, runs, steal_http, udp)
from test_steal_http import ME

from mirrord_tun.agent.dataplane import TUNNEL_NET6
from mirrord_tun.sandbox import ADDRS, ADDRS6, PY, Sandbox

POD6, CLIENT6, SVC6 = ADDRS6["pod"], ADDRS6["client"], ADDRS6["svc"]
CLIENT = ADDRS["client"]
MAPPED_CLIENT = f"::ffff:{CLIENT}"  # an IPv4 client as a dual-stack (`::`) server sees it
SERVER6 = [*PY, "-m", "mirrord_tun.sandbox.http_server", "::"]

# UDP echo on `::` (both families): argv[2] + the datagram, from the port it was sent to.
_UDP_ECHO6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(sys.argv[2].encode() + data, peer)
"""
# Listens on HTTP on `::`, prints "ready <IPv6 tunnel address> <pid>", serves nothing.
_LISTENER6 = f"""
import os, socket, time
probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
probe.connect(("{SVC6}", 9))
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", {HTTP}))
s.listen(16)
print("ready", probe.getsockname()[0], os.getpid(), flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN, nft)")
    box = Sandbox(ipv6=True)
    try:
        box.build()
        for port, name in ((HTTP, "pod"), (OTHER_PORT, "pod8080")):
            box.start_ready("pod", [*HTTP_SERVER, str(port), name])
            box.start_ready("pod", [*PY, "-m", "mirrord_tun.sandbox.http_server", POD6, str(port), name])
        box.start_ready("pod", [sys.executable, "-c", _UDP_ECHO6, str(UDP_ECHO_PORT), ""])
        yield box
    finally:
        box.close()


def get6(sb: Sandbox, port: int = HTTP, role: str = "client") -> str:
    return get(sb, port, role, host=POD6)


def steal6(sb: Sandbox, runs: list[Run], *options: str) -> Run:
    """The program on `::` under run --steal, once the pod's IPv6 clients reach it."""
    r = steal_http(sb, runs, *options, server=SERVER6)
    assert wait_until(lambda: get6(sb).startswith("hello from local"), LIVENESS, 0.2), r.log()
    return r


def test_ipv6_clients_reach_the_program_with_their_own_address(sb: Sandbox, agent: Agent,
                                                                runs: list[Run]) -> None:
    assert get6(sb) == f"hello from pod, you are {CLIENT6}"
    steal6(sb, runs)
    assert [get6(sb) for _ in range(10)] == [f"hello from local, you are {CLIENT6}"] * 10
    assert get(sb) == f"hello from local, you are {MAPPED_CLIENT}"  # IPv4 in the same session
    assert get6(sb, role="svc") == f"hello from local, you are {SVC6}"
    assert get6(sb, OTHER_PORT) == f"hello from pod8080, you are {CLIENT6}"  # other ports untouched


def test_udp_over_ipv6(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    assert udp(sb, "ping", POD6) == "ping"
    r = Run(sb, [sys.executable, "-c", _UDP_ECHO6, str(UDP_ECHO_PORT), "local:"])
    runs.append(r)
    assert wait_until(lambda: udp(sb, "ping", POD6) == "local:ping", LIVENESS, 0.2), r.log()
    assert udp(sb, "ping") == "local:ping"  # and IPv4
    r.close()
    assert wait_until(lambda: udp(sb, "pong", POD6) == "pong", LIVENESS, 0.1)


def test_excluded_ipv6_sources_keep_the_pod(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    r = Run(sb, [*SERVER6, str(HTTP), "local"], "--steal-exclude", f"{CLIENT6}/128")
    runs.append(r)
    assert wait_until(lambda: get6(sb, role="svc").startswith("hello from local"), LIVENESS, 0.2), r.log()
    assert [get6(sb) for _ in range(5)] == [f"hello from pod, you are {CLIENT6}"] * 5
    assert get(sb) == f"hello from local, you are {MAPPED_CLIENT}"  # an IPv6 exclusion leaves IPv4 alone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_the_port_comes_back_for_ipv6_clients_when_run_ends(sb: Sandbox, agent: Agent, runs: list[Run],
                                                            sig: signal.Signals) -> None:
    r = steal6(sb, runs)
    start = time.monotonic()
    r.kill() if sig == signal.SIGKILL else r.proc.send_signal(sig)
    given_back_after(sb, start, f"{sig.name} of run (IPv6)", lambda: get6(sb), CLIENT6)
    r.proc.wait(LIVENESS)
    assert wait_until(lambda: not leftovers(sb), LIVENESS), leftovers(sb)


def test_the_port_comes_back_for_ipv6_clients_when_every_agent_process_is_killed(
        sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    steal6(sb, runs)
    kill_every_agent_process(sb, agent, lambda: get6(sb), CLIENT6)
    assert get(sb) == f"hello from pod, you are {CLIENT}"  # the IPv4 table went inert with the IPv6 one


def test_an_in_flight_ipv6_connection_is_reset_when_the_session_dies(sb: Sandbox, agent: Agent,
                                                                     runs: list[Run]) -> None:
    reset_when_the_session_dies(sb, lambda: steal6(sb, runs), POD6, CLIENT6)


def test_a_hostile_pod_end_reaches_only_the_stolen_port_over_ipv6(sb: Sandbox, agent: Agent,
                                                                  runs: list[Run]) -> None:
    r = Run(sb, [sys.executable, "-c", _LISTENER6])
    runs.append(r)
    assert r.proc.stdout is not None
    _, addr, pid = r.proc.stdout.readline().decode().split()
    assert ipaddress.IPv6Address(addr) in TUNNEL_NET6
    assert wait_until(lambda: "stealing tcp/80" in r.log(), LIVENESS, 0.2), r.log()
    only_the_stolen_port_enters(sb, addr, pid, str(TUNNEL_NET6), POD6)


def _get_with(sb: Sandbox, host: str, *headers: str) -> str:
    url_host = f"[{host}]" if ":" in host else host
    r = sb.exec("client", "curl", "-gsS", "--max-time", "3", *(a for h in headers for a in ("-H", h)),
                f"http://{url_host}:{HTTP}/")
    return r.stdout.strip() if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def _get6_with(sb: Sandbox, *headers: str) -> str:
    return _get_with(sb, POD6, *headers)


def _local_delivery6(sb: Sandbox) -> str:
    return sb.exec("pod", "ip", "-6", "rule", "show").stdout + sb.exec("pod", "ip", "-6", "route", "show",
                                                                       "table", "all", "proto", "77").stdout


def test_filtered_steal_over_ipv6(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    """Matching IPv6 requests reach the program, the others the pod, each from the client's own
    IPv6 address; IPv4 beside them; the pod's IPv6 routing is as before once it ends."""
    before = _local_delivery6(sb)
    r = Run(sb, [*SERVER6, str(HTTP), "local"], "--http-header-filter", ME)
    runs.append(r)
    assert wait_until(lambda: _get6_with(sb, ME).startswith("hello from local"), LIVENESS, 0.2), r.log()
    assert [_get6_with(sb, ME) for _ in range(5)] == [f"hello from local, you are {CLIENT6}"] * 5
    assert [_get6_with(sb) for _ in range(5)] == [f"hello from pod, you are {CLIENT6}"] * 5
    assert get(sb) == f"hello from pod, you are {CLIENT}"
    assert _get_with(sb, ADDRS["pod"], ME) == f"hello from local, you are {MAPPED_CLIENT}"
    start = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    given_back_after(sb, start, "SIGTERM of a filtered run (IPv6)", lambda: _get6_with(sb, ME), CLIENT6)
    r.proc.wait(LIVENESS)
    assert wait_until(lambda: not leftovers(sb) and _local_delivery6(sb) == before, LIVENESS), \
        (leftovers(sb), _local_delivery6(sb))


def test_filtered_steal_over_ipv6_with_proxy_workers(sb: Sandbox, runs: list[Run]) -> None:
    """The same with `agent --steal-proxy-workers 2`: each IPv6 listener's copies reach the workers
    too, and the routing goes once the workers' connections have drained."""
    from test_steal_workers import WorkersAgent

    workers = WorkersAgent(sb)
    try:
        test_filtered_steal_over_ipv6(sb, workers, runs)
        assert len(workers.proxy_workers()) == 2
    finally:
        sb.stop(workers.guard)
    assert wait_until(lambda: not leftovers(sb), LIVENESS), leftovers(sb)
