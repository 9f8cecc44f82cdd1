"""An unauthenticated flood at an agent confined to 1,024 fds must not lock the key holder out.

The attacker is a separate process in a sandbox namespace: from the cluster network (another
source than the key holder) or from the laptop (the key holder's own source). It opens 1,100
TCP connections to the agent, optionally sends an SSH version line on each and stalls, and
holds them; from the cluster network it also redials whatever the agent closes, so the
pressure lasts as long as the test. Meanwhile the key holder's `mirrord-ns run` must get in.
The attacker's sockets die with its process, which the test stops in every case. Also here:
the same flood at an agent with fewer fds than one source may hold (EMFILE on accept), the
refused key's log line, and the eviction policy itself.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest

from conftest import Cluster, assert_clean, children, make_cluster, mrd_run, wait_until
from mirrord_tun.agent.admission import MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE, Admission, source_of
from mirrord_tun.sandbox import ADDRS, LAPTOP_ADDR, NODE_UPLINK, Sandbox

FLOOD = 1100
FD_LIMIT = 1024
FD_SLACK = 8  # allocator noise, not a leak: the flood's count is in the hundreds
LISTEN_BACKLOG = 100  # asyncssh's default for create_server
# Fewer spare fds than one source may hold unauthenticated, more than one session needs.
TIGHT_HEADROOM = MAX_UNAUTHENTICATED_PER_SOURCE - 4
IDLE_WATCH = 2.0  # seconds of a held flood in which the agent's CPU is watched

# Raises its own fd limit and dials in batches, each connection waited for until the agent
# has answered it (its version line) or closed it: a flood that lands, not SYNs the kernel
# parks in cookies. Prints "ready <held> <landed>", then holds (and, when told to, redials
# whatever the agent closes) until its stdin closes; its sockets die with it.
_ATTACKER = r"""
import resource, select, socket, sys, time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hello, redial = sys.argv[4] == "1", sys.argv[5] == "1"
BATCH = 50
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)


def still_open(s):
    try:
        while s.recv(65536):  # the agent's version line and KEXINIT: read and drop
            pass
    except BlockingIOError:
        return True
    except OSError:
        pass
    s.close()
    return False


def dial(n, timeout):
    held, landed, deadline = [], 0, time.monotonic() + timeout
    for start in range(0, n, BATCH):
        poller, waiting = select.poll(), {}
        for _ in range(min(BATCH, n - start)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, port))
            waiting[s.fileno()] = s
            poller.register(s, select.POLLIN)
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                s = waiting.pop(fd)
                poller.unregister(fd)
                landed += 1
                if still_open(s):
                    if hello:
                        s.send(b"SSH-2.0-stall\r\n")
                    held.append(s)
        held += waiting.values()
    return held, landed


socks, landed = dial(count, 20)
print("ready", len(socks), landed, flush=True)
stdin = select.poll()
stdin.register(sys.stdin, select.POLLIN)
while not stdin.poll(500):
    if redial:
        socks = [s for s in socks if still_open(s)]
        socks += dial(count - len(socks), 5)[0]
"""


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    """A cluster whose agent has 1,024 fds, soft and hard, and its stderr in a file."""
    log = tmp_path_factory.mktemp("agent") / "stderr"
    wrap = ("sh", "-c", 'exec "$@" 2>>"$0"', str(log), "prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--")
    for cluster in make_cluster(agent_wrap=wrap):
        # The cluster network reaches the agent's address through the node, as pods reach a node.
        cluster.sb.exec("client", "ip", "route", "add", f"{NODE_UPLINK}/32", "via", ADDRS["node"])
        yield cluster, log
    assert "Traceback" not in log.read_text()


def _worker_fds(cluster: Cluster) -> int:
    (worker,) = children(cluster.agent.pid)  # the guard's one child serves
    return len(os.listdir(f"/proc/{worker}/fd"))


class Attacker:
    def __init__(self, sb: Sandbox, role: str, hello: bool, redial: bool) -> None:
        host, port = sb.agent_address.rsplit(":", 1)
        self.sb = sb
        self.p = sb.start(role, [sys.executable, "-c", _ATTACKER, host, port, str(FLOOD), str(int(hello)),
                                 str(int(redial))], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ready(self) -> str:
        assert self.p.stdout is not None
        return self.p.stdout.readline().decode().strip()

    def stop(self) -> None:
        self.sb.stop(self.p)


class FdSampler(threading.Thread):
    """The most fds the agent worker held while it ran."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.peak = cluster, 0
        self.done = threading.Event()

    def run(self) -> None:
        # A sample before the first wait and one after the last: a flood that is over within 50 ms
        # (a quiet machine) was sampled never, and its peak read 0.
        while True:
            self.peak = max(self.peak, _worker_fds(self.cluster))
            if self.done.wait(0.05):
                break

    def __enter__(self) -> "FdSampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()
        self.peak = max(self.peak, _worker_fds(self.cluster))


@pytest.mark.parametrize("role, redial", [("client", True), ("laptop", False)], ids=["other-source", "same-source"])
@pytest.mark.parametrize("hello", [False, True], ids=["idle-tcp", "version-then-stall"])
def test_flood_does_not_lock_out_the_key_holder(confined: tuple[Cluster, Path], role: str, redial: bool,
                                                hello: bool) -> None:
    cluster, _ = confined
    sb = cluster.sb
    baseline = _worker_fds(cluster)
    with FdSampler(cluster) as fds:
        attacker = Attacker(sb, role, hello, redial)
        try:
            # Every connection reached the agent and was answered or closed by it.
            word, _held, landed = attacker.ready().split()
            assert (word, int(landed)) == ("ready", FLOOD)
            r = mrd_run(sb, "true")
            assert r.returncode == 0, r.stderr
            assert attacker.p.poll() is None  # the pressure lasted through the run
        finally:
            attacker.stop()
    # Strangers hold at most the total cap, plus what one turn of the loop accepts from the
    # listen backlog before its evictions close; without the caps the flood takes every fd.
    assert fds.peak <= baseline + MAX_UNAUTHENTICATED + LISTEN_BACKLOG, (fds.peak, baseline)
    assert_clean(sb)
    r = mrd_run(sb, "true")
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: _worker_fds(cluster) <= baseline + FD_SLACK, 20), (_worker_fds(cluster), baseline)


def test_refused_key_is_logged_with_fingerprint_and_source(confined: tuple[Cluster, Path], tmp_path: Path) -> None:
    cluster, log = confined
    wrong = asyncssh.generate_private_key("ssh-ed25519")
    wrong.write_private_key(tmp_path / "wrong")
    r = mrd_run(cluster.sb, "true", identity=str(tmp_path / "wrong"))
    assert r.returncode == 2 and "identity key was refused" in r.stderr, r.stderr
    fingerprint = wrong.get_fingerprint("sha256")
    lines = [line for line in log.read_text().splitlines() if fingerprint in line]
    assert lines and "refused key" in lines[0] and f"from {LAPTOP_ADDR}:" in lines[0], lines
    assert wrong.export_public_key("openssh").decode().split()[1] not in log.read_text()


def _worker_cpu_seconds(cluster: Cluster) -> float:
    (worker,) = children(cluster.agent.pid)
    with open(f"/proc/{worker}/stat") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def test_agent_out_of_fds_neither_spins_nor_stops_serving(confined: tuple[Cluster, Path]) -> None:
    """Fewer fds than one source may hold: accepts fail with EMFILE for as long as the flood stays."""
    cluster, _ = confined
    (worker,) = children(cluster.agent.pid)
    baseline = _worker_fds(cluster)
    # Only the soft limit: it can be put back without CAP_SYS_RESOURCE.
    limit = baseline + TIGHT_HEADROOM
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, FD_LIMIT))
    try:
        attacker = Attacker(cluster.sb, "laptop", hello=True, redial=False)
        try:
            with FdSampler(cluster) as fds:
                word, _held, landed = attacker.ready().split()
            assert (word, int(landed)) == ("ready", FLOOD)
            # It ran out: one source alone may hold more than the headroom (libuv's spare fd
            # for dropping connections at EMFILE comes and goes, hence the 2).
            assert fds.peak >= limit - 2, (fds.peak, limit)
            before = _worker_cpu_seconds(cluster)
            time.sleep(IDLE_WATCH)
            assert _worker_cpu_seconds(cluster) - before < IDLE_WATCH / 4  # a spinning loop burns it all
        finally:
            attacker.stop()
        assert wait_until(lambda: _worker_fds(cluster) <= baseline + FD_SLACK, 20), (_worker_fds(cluster), baseline)
        r = mrd_run(cluster.sb, "true")  # still at the low limit
        assert r.returncode == 0, r.stderr
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    assert_clean(cluster.sb)
    assert wait_until(lambda: _worker_fds(cluster) <= baseline + FD_SLACK, 20), (_worker_fds(cluster), baseline)


class _Conn:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_eviction_order_spares_progress_and_other_sources() -> None:
    """The policy itself: per-source first, least advanced then oldest, the newcomer always in."""
    evicted: list[tuple[str, str]] = []
    gate = Admission(lambda source, peer, cap: evicted.append((peer, cap)), total=4, per_source=2)
    holder, a1, a2, a3 = _Conn(), _Conn(), _Conn(), _Conn()
    gate.admit(holder, "10.0.0.1", "holder")
    gate.authenticating(holder)
    gate.admit(a1, "10.0.0.1", "a1")
    gate.admit(a2, "10.0.0.1", "a2")  # per-source cap: a1 (not authenticating) goes, not the older holder
    assert evicted == [("a1", "per-source")] and a1.aborted and not holder.aborted
    others = [_Conn() for _ in range(4)]
    for i, conn in enumerate(others):
        gate.admit(conn, f"10.0.1.{i}", f"o{i}")
    # total cap: the oldest of those not authenticating, whatever their source; never the holder
    assert [peer for peer, _ in evicted] == ["a1", "a2", "o0"] and not holder.aborted
    gate.leave(holder)  # authenticated: no longer counted nor evictable
    gate.admit(a3, "10.0.0.1", "a3")
    assert len(gate) == 4 and not holder.aborted


def test_total_cap_takes_from_the_source_holding_most() -> None:
    evicted: list[str] = []
    gate = Admission(lambda source, peer, cap: evicted.append(peer), total=4, per_source=3)
    holder = _Conn()
    gate.admit(holder, "10.0.0.1", "holder")  # oldest, and still before authentication
    for i in range(4):
        gate.admit(_Conn(), "10.0.0.2", f"b{i}")  # b0 goes: per-source cap
    gate.admit(_Conn(), "10.0.0.3", "c0")  # total cap: 10.0.0.2 holds the most
    assert evicted == ["b0", "b1"] and not holder.aborted


def test_sources_group_ipv6_by_64() -> None:
    assert source_of("fd00:1:2:3::4") == source_of("fd00:1:2:3:ffff::1") == "fd00:1:2:3::/64"
    assert source_of("::ffff:198.18.0.30") == "198.18.0.30"
    assert source_of("198.18.0.30") == "198.18.0.30"
