"""A flood at a filtered steal's port, from the attacker's side: no key, only the pod's address.

The agent is confined to 1,024 fds (soft and hard). A session steals port 80 with a header
filter, so the agent's proxy stands in front of everyone's connections to it. The attacker,
in the cluster network, opens 1,100 connections to the pod's port 80, sends each an
unfinished 60 KiB request head and holds them. Meanwhile the key holder's new `run` must
get in, the filtered steal must keep routing other clients' requests, and the agent must
hold no more than the per-source cap of the attacker's connections: the rest go to the pod's
own server in the kernel (never to the laptop, never dropped).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Iterator

import pytest

from conftest import assert_clean, children, mrd_run, wait_until
from test_steal import HTTP, LIVENESS, POD, Run
from test_steal_http import _LOCAL

from mirrord_tun.sandbox import ADDRS, PY, Sandbox

FLOOD = 1100
FD_LIMIT = 1024
PER_SOURCE = 128  # steal.proxy.connection_caps() at 1,024 fds
SLACK = 64  # the session's own sockets, spare sockets made ahead, allocator noise
ME = "x-mirrord-user: me"

# Opens `count` connections, sends each an unfinished 60 KiB head, prints "ready N" (how many
# connected) and holds them until its stdin closes; its sockets die with it.
_ATTACKER = r"""
import resource, select, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
head = b"GET / HTTP/1.1\r\nHost: pod\r\nX-Pad: " + b"a" * 60 * 1024
held = []
for _ in range(count):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        s.setblocking(False)
        try:
            s.send(head)
        except BlockingIOError:
            pass
        held.append(s)
    except OSError:
        s.close()
print("ready", len(held), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN, nft)")
    box = Sandbox()
    try:
        box.build()
        # The pod's server may take the whole flood: that is its own capacity, not ours.
        box.start_ready("pod", ["prlimit", "--nofile=8192:8192", "--", *PY, "-m", "mirrord_tun.sandbox.http_server",
                                "0.0.0.0", str(HTTP), "pod"])
        yield box
    finally:
        box.close()


@pytest.fixture(params=[0, 2], ids=["agent alone", "two proxy workers"])
def agent(sb: Sandbox, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    guard = sb.start_agent("--steal-proxy-workers", str(request.param),
                           wrap=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"))
    yield guard
    sb.stop(guard)


def _worker_fds(guard: subprocess.Popen[bytes]) -> int:
    """The fds of the agent worker and of its proxy workers: the caps hold for them together."""
    (worker,) = children(guard.pid)
    total = 0
    for pid in [worker, *children(worker)]:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # a short-lived child (nft) gone meanwhile
            pass
    return total


def _get(sb: Sandbox, role: str, *headers: str) -> str:
    r = sb.exec(role, "curl", "-sS", "--max-time", "20", *(a for h in headers for a in ("-H", h)), f"http://{POD}:{HTTP}/")
    return r.stdout.strip() if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def test_a_flood_of_unfinished_heads_neither_locks_out_the_key_holder_nor_stops_the_steal(
        sb: Sandbox, agent: subprocess.Popen[bytes]) -> None:
    run = Run(sb, [*PY, "-c", _LOCAL, "me", str(HTTP)], "--http-header-filter", ME, name="flooded")
    try:
        assert wait_until(lambda: _get(sb, "svc", ME).startswith("hello from local-me"), LIVENESS, 0.2), run.log()
        baseline = _worker_fds(agent)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _worker_fds(agent))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        attacker = sb.start("client", [sys.executable, "-c", _ATTACKER, POD, str(HTTP), str(FLOOD)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert attacker.stdout is not None
            word, connected = attacker.stdout.readline().decode().split()
            # Never dropped: every connection reached a server, ours or past the cap the pod's.
            assert (word, int(connected)) == ("ready", FLOOD)
            r = mrd_run(sb, "true")  # the key holder's new session
            assert r.returncode == 0, r.stderr
            other = ADDRS["svc"]  # another source: its requests are still routed by the filter
            assert _get(sb, "svc", ME) == f"hello from local-me, you are {other}"
            assert _get(sb, "svc") == f"hello from pod, you are {other}"
            assert attacker.poll() is None  # the flood held through all of it
        finally:
            sb.stop(attacker)
            done.set()
            sampler.join()
        assert peak[0] <= baseline + PER_SOURCE + SLACK, (peak[0], baseline)
        assert wait_until(lambda: _worker_fds(agent) <= baseline + SLACK, LIVENESS), (_worker_fds(agent), baseline)
        assert _get(sb, "svc", ME).startswith("hello from local-me")
    finally:
        run.close()
    assert_clean(sb)


def test_the_caps_keep_a_flood_inside_the_agent_jobs_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real cluster two pods' floods of unfinished heads got the agent OOMKilled under
    its Job's 256Mi limit (kube/manifest.py), ending the key holder's session: the caps now
    follow the container's memory limit as well as its fds."""
    from mirrord_tun.agent.steal import proxy
    limit = 256 * 1024 * 1024
    monkeypatch.setattr(proxy, "memory_limit", lambda: limit)
    per_source, total = proxy.connection_caps()
    assert total * proxy.PER_CONNECTION + proxy.MEMORY_RESERVE <= limit
    assert 2 * per_source <= total
