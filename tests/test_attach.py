"""`mirrord-ns attach`: an existing namespace joins the tunnel and is given back exactly.

The namespace attached here ("app") is an ordinary one with routing of its own: a
veth to the laptop and a default route through it, like a container on a bridge.
Its `ip addr/route/link/rule`, nft ruleset and resolv.conf are compared before and after.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import POD, SVC, Cluster, assert_clean, read_line, run_env, wait_until
from test_mirror import CLIENT, assert_pod_answered, post

from mirrord_tun.mirror.feature import mirrorable
from mirrord_tun.sandbox import NODE_UPLINK, Sandbox

APP_GW, APP_ADDR = "198.19.1.1", "198.19.1.2"  # laptop side, app side of their link
ATTACH_TIMEOUT = 30
MIRROR_PORT = 8088  # served by the pod and, for the copies, by a recorder in the attached namespace


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def make_app(sb: Sandbox) -> Iterator[str]:
    """A namespace "app" behind the laptop (default route via it); removed afterwards."""
    name = sb.ns("app")
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", sb.ns("laptop"), "link", "add", "app0", "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("-n", sb.ns("laptop"), "addr", "add", f"{APP_GW}/30", "dev", "app0")
        ip("-n", sb.ns("laptop"), "link", "set", "app0", "up")
        ip("-n", name, "addr", "add", f"{APP_ADDR}/30", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", APP_GW)
        # IPv6 duplicate address detection changes `ip addr` on its own for a moment: let it end.
        assert wait_until(lambda: "tentative" not in ip("-n", name, "addr"), 10)
        yield name
    finally:
        # Deleting the link first frees its name now; a deleted namespace's links go asynchronously.
        subprocess.run(["ip", "-n", sb.ns("laptop"), "link", "del", "app0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["rm", "-rf", f"/etc/netns/{name}"])


@pytest.fixture
def app(cluster: Cluster) -> Iterator[str]:
    yield from make_app(cluster.sb)


@pytest.fixture
def fresh_app(fresh_cluster: Cluster) -> Iterator[str]:
    yield from make_app(fresh_cluster.sb)


def snapshot(ns: str) -> dict[str, str]:
    """What attach may touch: addresses, routes (all tables), links, rules, the resolver file."""
    state = {what: ip("-n", ns, *what.split()) for what in ("addr", "route show table all", "link", "rule")}
    state["nft"] = in_app(ns, "nft", "list", "ruleset").stdout  # the mirror's table
    try:
        with open(f"/etc/netns/{ns}/resolv.conf") as f:
            state["resolv.conf"] = f.read()
    except FileNotFoundError:
        state["resolv.conf"] = "(absent)"
    state["/etc/netns entry"] = str(os.path.exists(f"/etc/netns/{ns}"))
    return state


def start_attach(sb: Sandbox, app: str, inside: str = "laptop") -> subprocess.Popen[bytes]:
    """`attach --netns` run from `inside`'s namespace; waits for its "is in the pod's network" line."""
    argv = ["ip", "netns", "exec", sb.ns(inside) if inside != "app" else app, sys.executable, "-m",
            "mirrord_tun", "attach", "--netns", f"/run/netns/{app}", "--agent", sb.agent_address,
            "--identity", sb.keys.identity, "--agent-host-key", sb.keys.host_pub]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env())
    sb.procs.append(p)
    p.stdout = p.stderr  # read_line reads stdout: the announcement comes on stderr
    line = read_line(p, ATTACH_TIMEOUT)
    assert "in the pod's network" in line, line
    return p


def in_app(app: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", app, *argv], capture_output=True, text=True, timeout=30)


def detach(p: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    p.send_signal(sig)
    return p.wait(ATTACH_TIMEOUT)


def test_attach_puts_a_namespace_in_the_pods_network_and_restores_it(cluster: Cluster, app: str) -> None:
    before = snapshot(app)
    assert in_app(app, "curl", "-sS", "-m", "2", f"http://{SVC}/").returncode != 0  # no way there alone
    p = start_attach(cluster.sb, app)
    curl = in_app(app, "curl", "-sS", "-m", "10", f"http://{SVC}/")
    assert curl.stdout == f"hello from svc, you are {POD}\n", curl.stderr
    # The pod's resolver and search domains, through the file `ip netns exec` shows it.
    assert in_app(app, "getent", "hosts", "svc").stdout.split()[0] == SVC
    # Its own subnet stays its own: the laptop end of its link answers directly.
    assert in_app(app, "busybox", "ping", "-c", "1", "-W", "5", APP_GW).returncode == 0
    assert detach(p) == 0
    assert snapshot(app) == before
    assert_clean(cluster.sb)


def test_attach_mirrors_the_pods_inbound_traffic_and_restores(cluster: Cluster, app: str) -> None:
    """A recorder in the attached namespace gets byte-identical copies of what a client sends the
    pod, with the client's address, while the pod answers; the mirror's routing is undone after."""
    sb = cluster.sb
    record = Path(sb.dir) / "attach-mirror.jsonl"
    record.touch()
    py = sys.executable
    pod = sb.start_ready("pod", [py, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", str(MIRROR_PORT), "pod"])
    try:
        before = snapshot(app)
        recorder = sb.start_ready("app", [py, "-m", "mirrord_tun.sandbox.recorder", "tcp", str(MIRROR_PORT),
                                          str(record)])
        p = start_attach(sb, app)

        def records() -> list[dict[str, object]]:
            return [json.loads(line) for line in record.read_text().splitlines()]

        def probed() -> bool:  # until the port is learned and the agent's filter is set
            post(sb, 1, 1, 16, path="/probe", port=MIRROR_PORT)
            return any(r["path"] == "/probe" for r in records())

        assert wait_until(probed, 30, interval=0.5)
        results = post(sb, 20, 5, 1_000_000, seed=11, port=MIRROR_PORT)
        assert_pod_answered(results)

        def copies() -> list[dict[str, object]]:
            return [r for r in records() if r["path"] != "/probe"]

        assert wait_until(lambda: len(copies()) >= len(results), 60, interval=0.5)
        assert sorted(str(r["sha"]) for r in copies()) == sorted(str(r["sha"]) for r in results)
        assert {r["peer"] for r in copies()} == {CLIENT} and all(r["complete"] for r in copies())
        assert detach(p) == 0
        sb.stop(recorder)
        assert snapshot(app) == before
    finally:
        sb.stop(pod)


def test_the_agents_own_address_is_not_mirrored(caplog: pytest.LogCaptureFixture) -> None:
    """A pod address our SSH connection goes to (attach sets `mirror_exclude` when that connection
    lives in the attached namespace) stays off `lo`, where it would swallow the connection; one warning."""
    assert mirrorable([POD, "198.18.0.11"], exclude={POD}, local_ipv6=True) == ["198.18.0.11"]
    assert caplog.text.count(f"not mirroring traffic to {POD}") == 1


def test_a_namespace_without_ipv6_mirrors_the_ipv4_clients_only(caplog: pytest.LogCaptureFixture) -> None:
    """A container started with IPv6 disabled (Docker's default) attached to a dual-stack pod: the
    IPv6 pod address cannot be made local there, so its copies are dropped (counted); one warning."""
    assert mirrorable([POD, "fd00:198:18::10"], exclude=set(), local_ipv6=False) == [POD]
    assert caplog.text.count("not mirroring the pod's IPv6 clients") == 1


def test_sigterm_detaches_too(cluster: Cluster, app: str) -> None:
    before = snapshot(app)
    p = start_attach(cluster.sb, app)
    assert detach(p, signal.SIGTERM) == 0
    assert snapshot(app) == before


def test_attach_from_inside_keeps_its_own_ssh_off_the_tunnel(cluster: Cluster, app: str) -> None:
    """As a sidecar does: attach runs in the namespace it attaches, reaching the agent via its
    default route; the agent's address is pinned to that route while attached, and unpinned after."""
    sb = cluster.sb
    # Give the app a way to the agent: the laptop forwards, the node routes back.
    subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    ip("-n", sb.ns("node"), "route", "add", f"{APP_ADDR}/32", "via", "198.19.0.1")
    try:
        before = snapshot(app)
        p = start_attach(sb, app, inside="app")
        assert f"{NODE_UPLINK} via {APP_GW}" in ip("-n", app, "route", "show", NODE_UPLINK)
        curl = in_app(app, "curl", "-sS", "-m", "10", f"http://{SVC}/")
        assert curl.stdout == f"hello from svc, you are {POD}\n", curl.stderr
        assert detach(p) == 0
        assert snapshot(app) == before
    finally:
        ip("-n", sb.ns("node"), "route", "del", f"{APP_ADDR}/32")
        subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), "sysctl", "-qw", "net.ipv4.ip_forward=0"])


def test_a_killed_attach_is_undone_by_the_next(cluster: Cluster, app: str) -> None:
    """SIGKILL leaves the resolver file (and a pin) behind; the next attach restores the original."""
    sb = cluster.sb
    os.makedirs(f"/etc/netns/{app}")
    with open(f"/etc/netns/{app}/resolv.conf", "w") as f:
        f.write("nameserver 198.18.9.9\n")
    before = snapshot(app)
    p = start_attach(sb, app)
    assert "mrd0" in ip("-n", app, "link")
    p.send_signal(signal.SIGKILL)  # `ip netns exec` execs in place: this is the attach process
    p.wait(5)
    assert wait_until(lambda: "mrd0" not in ip("-n", app, "link"), 10)
    assert snapshot(app)["resolv.conf"] != before["resolv.conf"]  # still the pod's
    p = start_attach(sb, app)
    assert detach(p) == 0
    assert snapshot(app) == before


def test_attach_errors(cluster: Cluster, app: str) -> None:
    sb = cluster.sb
    base = [sys.executable, "-m", "mirrord_tun", "attach", "--agent", sb.agent_address,
            "--identity", sb.keys.identity, "--agent-host-key", sb.keys.host_pub]
    both = subprocess.run([*base, "--netns", f"/run/netns/{app}", "--pid", "1"], capture_output=True, text=True)
    assert both.returncode == 2 and "exactly one of" in both.stderr
    p = start_attach(sb, app)
    try:
        again = subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), *base, "--netns", f"/run/netns/{app}"],
                               capture_output=True, text=True, timeout=ATTACH_TIMEOUT, env=run_env())
        assert again.returncode == 2 and "already has mrd0" in again.stderr, again.stderr
    finally:
        assert detach(p) == 0



def wait_for_line(p: subprocess.Popen[bytes], text: str, timeout: float = ATTACH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        line = read_line(p, max(deadline - time.monotonic(), 0.1))
        if text in line:
            return


def test_sidecar_attaches_again_when_the_agent_comes_back(fresh_cluster: Cluster, fresh_app: str) -> None:
    """The sidecar in its own namespace, as in a container: `ip netns exec` bind-mounts the app's
    resolv.conf over /etc/resolv.conf as Docker does, and the sidecar rewrites that file in place."""
    sb, app = fresh_cluster.sb, fresh_app
    os.makedirs(f"/etc/netns/{app}")
    with open(f"/etc/netns/{app}/resolv.conf", "w") as f:
        f.write("nameserver 198.18.9.9\n")
    subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    ip("-n", sb.ns("node"), "route", "add", f"{APP_ADDR}/32", "via", "198.19.0.1")
    before = snapshot(app)
    p = subprocess.Popen(["ip", "netns", "exec", app, sys.executable, "-m", "mirrord_tun", "sidecar",
                          "--agent", sb.agent_address, "--identity", sb.keys.identity,
                          "--agent-host-key", sb.keys.host_pub], stderr=subprocess.PIPE, env=run_env())
    sb.procs.append(p)
    p.stdout = p.stderr  # read_line reads stdout; the sidecar talks on stderr
    wait_for_line(p, "in the pod's network")
    assert in_app(app, "curl", "-sS", "-m", "10", "http://svc/").stdout == f"hello from svc, you are {POD}\n"
    assert in_app(app, "getent", "hosts", "svc").stdout.split()[0] == SVC  # the file it rewrote in place
    assert fresh_cluster.agent is not None
    sb.stop(fresh_cluster.agent)
    wait_for_line(p, "attaching again")
    sb.start_agent()
    wait_for_line(p, "in the pod's network")
    assert in_app(app, "curl", "-sS", "-m", "10", "http://svc/").stdout == f"hello from svc, you are {POD}\n"
    assert detach(p, signal.SIGTERM) == 0
    assert snapshot(app) == before
