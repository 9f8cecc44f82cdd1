"""The mirror with a local program slower than the pod, at default priority, as a real server sees it.

The local program here (`_SLOW_SERVER`) is an HTTP/1.1 server that reads each body
in 64 KiB pieces with a pause after each, like a program under a debugger or a
slow handler: what it has not taken yet must wait in `run`'s spill, not be reset.
Before it answers it checks, as nginx does (its 499), whether the client has
already closed: the mirror must hold the client's FIN until the program answered.
On a request to /quit it stops listening until the test creates FILE.up, so a
request made in between tests delivery across a restart.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest

from conftest import wait_until
from pyroute2 import IPRoute

from mirrord_tun.mirror import delivery, spill, tcp_writer
from mirrord_tun.mirror.reassembly import Flow
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.pump import Counters
from mirrord_tun.sandbox import Sandbox, nginx
from test_mirror import (CLIENT, DELIVERY_TIMEOUT, HTTP_PORT, POD, Session, assert_all_mirrored,
                         assert_nothing_given_up, assert_nothing_leaked, assert_pod_answered, counters, pod_sandbox,
                         post)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN, nft)")

PY = sys.executable
READ_PAUSE = 0.01  # seconds after each 64 KiB read: at most 6.4 MB/s per connection

_SLOW_SERVER = f"""
import hashlib, json, os, socket, sys, threading, time
port, record = int(sys.argv[1]), sys.argv[2]
host = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
lock, quit_ = threading.Lock(), threading.Event()

def log(**fields):
    with lock, open(record, "a") as f:
        f.write(json.dumps(fields) + "\\n")

def serve(conn, peer):
    f = conn.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            return
        path = line.split()[1].decode()
        n = 0
        while (h := f.readline()) not in (b"\\r\\n", b""):
            if h.lower().startswith(b"content-length:"):
                n = int(h.split(b":")[1])
        sha, got = hashlib.sha256(), 0
        while got < n:
            chunk = f.read1(min(n - got, 1 << 16))
            if not chunk:
                break
            sha.update(chunk)
            got += len(chunk)
            time.sleep({READ_PAUSE})
        time.sleep(0.05)  # the upstream's work; meanwhile a proxy watches for the client closing
        try:
            closed = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            closed = False
        log(sha=sha.hexdigest(), len=got, peer=peer[0], path=path, complete=got == n,
            closed_before_answer=closed)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        if path == "/quit":
            quit_.set()

def listen():
    srv = socket.create_server((host, port), backlog=128)
    srv.settimeout(0.1)
    return srv

srv = listen()
print("ready", flush=True)
while True:
    if quit_.is_set():  # a restart: nothing listens until the test says so
        srv.close()
        log(down=True)
        while not os.path.exists(record + ".up"):
            time.sleep(0.1)
        quit_.clear()
        srv = listen()
        log(up=True)
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        continue
    conn.settimeout(None)
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

sandbox = pytest.fixture(scope="module", name="sb")(pod_sandbox)

_LOSS = ("table inet mrdloss {\n"
         "  chain out { type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < 3 drop; }\n"
         "  chain in { type filter hook input priority 0; iifname \"eth0\" numgen random mod 100 < 3 drop; }\n"
         "}\n")


def agent_counters(log: str) -> dict[str, int]:
    """The agent's STATS, as `run -v` logs them when it ends."""
    m = re.search(r"^mirrord-ns: agent: (.*)$", log, re.M)
    return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in m[1].split(", "))} if m else {}


def slow_server() -> list[str]:
    return [PY, "-c", _SLOW_SERVER, str(HTTP_PORT), "{record}"]


def assert_answered_before_fin(s: Session) -> None:
    """No request looked aborted to the program (nginx would have logged 499)."""
    aborted = [r for r in s.records() if r["closed_before_answer"]]
    assert not aborted, f"{len(aborted)} requests saw the client's FIN before the answer\n{s.log()}"


def test_acceptance_scenario_with_a_slow_program(sb: Sandbox) -> None:
    with Session(sb, "slow", slow_server()) as s:
        s.wait_mirroring()
        results = post(sb, 200, 20, 4 * 1024 * 1024, seed=11)
        assert_pod_answered(results)
        assert sb.exec("client", "nft", "-f", "-", input=_LOSS).returncode == 0
        try:
            lossy = post(sb, 60, 20, 4 * 1024 * 1024, seed=12)
        finally:
            sb.exec("client", "nft", "delete", "table", "inet", "mrdloss")
        assert_pod_answered(lossy)
        assert_all_mirrored(s, results + lossy)
        assert_answered_before_fin(s)
    assert_nothing_given_up(s.log())
    assert_nothing_leaked(s.log())
    c, agent = counters(s.log()), agent_counters(s.log())
    # Reported, not asserted: the figures go to the bench.
    print(f"spilled to disk {c.get('mirror_spilled_bytes', 0)} bytes; agent: "
          f"mirror_dropped_kernel {agent.get('mirror_dropped_kernel')}, mirror_paused {agent.get('mirror_paused')}")


@pytest.mark.parametrize("size", [20_000_000, 100_000_000])
def test_single_large_post_at_full_speed(sb: Sandbox, size: int) -> None:
    with Session(sb, f"large{size}", slow_server()) as s:
        s.wait_mirroring()
        results = post(sb, 2, 1, size, seed=13)  # an empty body, then one of `size`
        assert_pod_answered(results)
        assert_all_mirrored(s, results)
        assert_answered_before_fin(s)
    assert_nothing_given_up(s.log())


@pytest.mark.skipif(not shutil.which("nginx"), reason="needs nginx")
def test_nginx_logs_mirrored_requests_as_answered(sb: Sandbox) -> None:
    """nginx in front of the slow program: 200 in its log, not 499 (client closed first)."""
    d = Path(sb.dir)
    argv = nginx.configure(str(d), f"0.0.0.0:{HTTP_PORT}", f"proxy_pass http://127.0.0.1:{HTTP_PORT + 1};",
                           access_log=True, main="user root;", http="client_max_body_size 0;")
    (d / "slow_server.py").write_text(_SLOW_SERVER)
    # Upstream on 127.0.0.1 only: not mirrored itself (the mirror serves wildcard and pod listeners).
    both = (f"{PY} {d}/slow_server.py {HTTP_PORT + 1} {{record}} 127.0.0.1 & "
            f"exec {shlex.join(argv)}")
    with Session(sb, "nginx", ["sh", "-c", both]) as s:
        s.wait_mirroring()
        results = post(sb, 20, 10, 1024 * 1024, seed=17)
        assert_pod_answered(results)
        log = d / nginx.ACCESS_LOG
        statuses = lambda: re.findall(r'" (\d{3}) ', log.read_text())  # noqa: E731
        assert wait_until(lambda: len(statuses()) > len(results), DELIVERY_TIMEOUT, 0.5), log.read_text()
        assert set(statuses()) == {"200"}, log.read_text()  # the probe's and every request's
        want = {str(r["sha"]) for r in results}
        assert want <= {str(r["sha"]) for r in s.records() if r["complete"]}, s.log()


def test_connection_made_while_the_program_restarts(sb: Sandbox) -> None:
    with Session(sb, "restart", slow_server()) as s:
        s.wait_mirroring()
        assert_pod_answered(post(sb, 1, 1, 16, path="/quit"))
        lines = lambda: [json.loads(line) for line in s.record.read_text().splitlines()]  # noqa: E731
        assert wait_until(lambda: any(r.get("down") for r in lines()), 30, 0.1), s.log()
        during = post(sb, 5, 5, 200_000, seed=14)  # nothing listens locally now: connects are refused
        assert_pod_answered(during)
        assert not any(r.get("up") for r in lines())
        Path(str(s.record) + ".up").touch()
        after = post(sb, 5, 5, 200_000, seed=15)
        want = {str(r["sha"]) for r in during + after}
        got = lambda: {str(r["sha"]) for r in s.records() if r["complete"]}  # noqa: E731
        assert wait_until(lambda: want <= got(), DELIVERY_TIMEOUT, 0.5), s.log()
    c = counters(s.log())
    assert c.get("mirror_connect_retries", 0) >= 1 and c.get("mirror_connect_failed", 0) == 0, s.log()


def test_spill_keeps_order_in_an_unnamed_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "MEMORY_CAP", 1000)
    rng = random.Random(16)
    totals = spill.SpillTotals()
    sp, sent, got = spill.Spill(totals), bytearray(), bytearray()
    try:
        for _ in range(300):
            data = rng.randbytes(rng.randint(0, 3000))
            sp.push(data)
            sent += data
            if rng.random() < 0.4:
                got += sp.pop(rng.randint(1, 5000))
            assert totals.waiting == len(sp)
        assert sp.filed > 0
        assert sp._fd is not None and "mirrord-ns" in os.readlink(f"/proc/self/fd/{sp._fd}")
        assert os.listdir(spill.SPILL_DIR) == []  # no name another process could open
        while chunk := sp.pop(4096):
            got += chunk
        assert got == sent and len(sp) == 0 and totals.memory == totals.waiting == 0
        assert os.fstat(sp._fd).st_size == 0  # drained: the disk space is given back
    finally:
        sp.close()
    st = os.stat(spill.SPILL_DIR)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700


async def _deliver_to_a_program_that_never_reads(spill_limit: int) -> Counters:
    """16 MiB fed to one delivery, in a namespace of its own, toward a listener that never reads."""
    counters: Counters = collections.Counter()
    ns = NetNs.new()
    try:
        await ns.acall(_lo_up)
        await ns.acall(delivery.install_routing, [ipaddress.IPv4Address(POD)])
        listener = await ns.acall(socket.create_server, (POD, HTTP_PORT))  # accepts nothing, reads nothing
        flow = Flow(CLIENT, 40000, POD, HTTP_PORT)
        d = delivery.Deliveries(ns, lambda port: port, counters, lambda f: None, lambda f, p, e: None,
                                spill_limit=spill_limit)
        d.open(flow)
        for _ in range(256):
            d.data(flow, os.urandom(64 * 1024))
            await asyncio.sleep(0)
        for _ in range(100):
            if flow not in d.tcp:
                break
            await asyncio.sleep(0.1)
        d.close_all()
        listener.close()
        assert d.spilled.waiting == d.spilled.memory == 0  # all given back
        return counters
    finally:
        ns.close()


def _lo_up() -> None:
    """lo up, and a default route (`run`'s goes through the TUN): the program's answers
    need a route before the mirror's mark sends them back up locally."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.route("add", dst="0.0.0.0/0", oif=lo)


def test_a_program_that_takes_nothing_is_reset_after_the_stuck_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_writer, "STUCK_TIMEOUT", 1.0)  # 60 s in `run`
    c = asyncio.run(_deliver_to_a_program_that_never_reads(delivery.SPILL_LIMIT))
    assert c["mirror_reset_stuck"] == 1 and c["mirror_spill_given_up"] == 0, c


def test_past_the_spill_limit_a_connection_is_given_up() -> None:
    c = asyncio.run(_deliver_to_a_program_that_never_reads(4 * 1024 * 1024))
    assert c["mirror_spill_given_up"] == 1 and c["mirror_reset_stuck"] == 0, c
