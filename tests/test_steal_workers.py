"""Filtered steal served by several processes: `agent --steal-proxy-workers 2`, real sockets end to end.

The agent and two proxy workers accept the filtered port's connections (SO_REUSEPORT spreads
them); a worker serves requests for the pod and hands a connection to the agent at its first
request a session's filter takes, or at HTTP/2. From the client's side every connection must
behave as with one process: each request where the filter says, bodies and pipelined requests
intact, the client's own address seen by both servers.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest
from conftest import children, kill_pids, leftovers, pid_alive, wait_until
import test_steal_h2
import test_steal_http as http
from test_steal import LIVENESS, POD, Agent, Run, runs, sb  # noqa: F401 - fixtures
from test_steal_http import CLIENT, HTTP, ME, get, routing_left

from mirrord_tun.sandbox import PY, Sandbox

WORKERS = 2
CONNECTIONS = 24  # spread over three processes by the kernel's hash: some land on each

# CONNECTIONS keep-alive connections at once, each: a request for the pod (or, every other
# connection, for the program), then a POST for the program with a 150 kB body and a GET for
# the pod pipelined in one write, then one more of each. Prints per connection the answers.
_MIX = """
import hashlib, json, os, socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def request(method, path, me, body=b""):
    head = f"{method} {path} HTTP/1.1\\r\\nHost: pod\\r\\nContent-Length: {len(body)}\\r\\n"
    return (head + ("X-Mirrord-User: me\\r\\n" if me else "") + "\\r\\n").encode() + body

def answer(f):
    status = f.readline()
    length = 0
    while (line := f.readline()) not in (b"\\r\\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status.split()[1].decode() + " " + f.read(length).decode().strip()

def one(i, out):
    got = []
    try:
        exchange(i, out, got)
    except Exception as e:
        out[i] = {"got": got, "error": repr(e)}

def exchange(i, out, got):
    s = socket.create_connection((host, port), timeout=20)
    f = s.makefile("rb")
    body = os.urandom(150_000 + i)
    s.sendall(request("GET", f"/{i}", i % 2 == 1))
    got.append(answer(f))
    s.sendall(request("POST", "/body", True, body) + request("GET", "/after", False))
    got += [answer(f), answer(f)]
    for me in (True, False):
        s.sendall(request("GET", "/again", me))
        got.append(answer(f))
    out[i] = {"got": got, "sha": hashlib.sha256(body).hexdigest()}
    s.close()

out = {}
threads = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


class WorkersAgent(Agent):
    def __init__(self, sb: Sandbox) -> None:  # noqa: F811
        self.sb = sb
        self.guard = sb.start_agent("--steal-proxy-workers", str(WORKERS))

    def restart(self) -> None:
        self.sb.stop(self.guard)
        self.guard = self.sb.start_agent("--steal-proxy-workers", str(WORKERS))

    def proxy_workers(self) -> list[int]:
        agent = self.worker()
        return [p for p in children(agent) if b"mirrord_tun.agent.steal.worker" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.fixture
def agent(sb: Sandbox) -> Iterator[WorkersAgent]:  # noqa: F811
    a = WorkersAgent(sb)
    try:
        yield a
        a.restart()
        assert wait_until(lambda: not leftovers(sb), LIVENESS), leftovers(sb)
    finally:
        sb.stop(a.guard)


# test_steal_http's program with a listen backlog for CONNECTIONS at once (socketserver's is 5:
# under a burst of new connections through the tunnel it closed some unanswered, agent alone too).
_LOCAL = http._LOCAL.replace("import hashlib, http.server, sys",
                             "import hashlib, http.server, sys\nhttp.server.ThreadingHTTPServer.request_queue_size = 128")


@pytest.fixture
def steal_me(sb: Sandbox, agent: WorkersAgent, runs: list[Run]) -> Iterator[Run]:  # noqa: F811
    r = Run(sb, [*PY, "-c", _LOCAL, "me", str(HTTP)], "--http-header-filter", ME, name="me")
    runs.append(r)
    assert wait_until(lambda: get(sb, ME).startswith("hello from local-me"), LIVENESS, 0.2), r.log()
    yield r


def _mix(sb: Sandbox) -> dict:
    r = sb.exec("client", sys.executable, "-c", _MIX, POD, str(HTTP), str(CONNECTIONS), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _check_mix(out: dict) -> None:
    assert len(out) == CONNECTIONS
    for i, conn in out.items():
        assert "error" not in conn, (i, conn)
        first = "local-me" if int(i) % 2 == 1 else "pod"
        assert conn["got"] == [
            f"200 hello from {first}, you are {CLIENT}",
            f"200 local-me {conn['sha']} from {CLIENT}",
            f"200 hello from pod, you are {CLIENT}",
            f"200 hello from local-me, you are {CLIENT}",
            f"200 hello from pod, you are {CLIENT}",
        ], (i, conn)


def _workers_hold_connections(sb: Sandbox, workers: list[int]) -> bool:
    """Whether an established connection in the pod belongs to a proxy worker (ss -p)."""
    out = sb.exec("pod", "ss", "-tnpH", "state", "established").stdout
    return any(f"pid={pid}," in out for pid in workers)


def test_keep_alive_mixes_are_routed_right_whichever_process_accepted(sb: Sandbox, agent: WorkersAgent,
                                                                      steal_me: Run) -> None:
    workers = agent.proxy_workers()
    assert len(workers) == WORKERS
    _check_mix(_mix(sb))
    # The workers did serve: a connection that only asks the pod stays with the process that took it.
    client = sb.start("client", [sys.executable, "-c", http._TWO_CONNECTIONS.replace("range(2)", "range(24)")
                                 .replace('zip(conns, ({"x-mirrord-user": "me"}, {}))', "zip(conns, [{}] * 24)"),
                                 POD, str(HTTP)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        for _ in range(24):
            assert client.stdout.readline().decode().strip() == f"hello from pod, you are {CLIENT}"
        assert _workers_hold_connections(sb, workers)
    finally:
        sb.stop(client)


def test_h2_prior_knowledge_is_handed_over_and_filtered(sb: Sandbox, agent: WorkersAgent, runs: list[Run]) -> None:  # noqa: F811
    for _ in range(4):  # one connection each time: some accepted by a worker
        test_steal_h2.test_h2_streams_routed_by_the_agent_end_to_end(sb, agent, runs)


def test_a_killed_worker_leaves_the_port_working(sb: Sandbox, agent: WorkersAgent, steal_me: Run) -> None:
    workers = agent.proxy_workers()
    kill_pids(workers[:1])
    assert wait_until(lambda: not pid_alive(workers[0]), LIVENESS)
    time.sleep(0.5)  # the agent notices (its socketpair ends); not replaced
    _check_mix(_mix(sb))
    for _ in range(10):
        assert get(sb, ME).startswith("hello from local-me") and get(sb).startswith("hello from pod")
    assert agent.proxy_workers() == workers[1:]


def test_killing_the_agent_kills_its_workers_and_the_port_comes_back(sb: Sandbox, agent: WorkersAgent,
                                                                      steal_me: Run) -> None:
    workers = agent.proxy_workers()
    assert len(workers) == WORKERS
    kill_pids([agent.worker()])
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), LIVENESS), workers
    http.given_back_after(sb, time.monotonic(), "kill -9 of the agent worker with proxy workers")
    agent.guard.wait(LIVENESS)
    assert leftovers(sb) == [] and not routing_left(sb)


def test_the_workers_hold_no_secret(agent: WorkersAgent, steal_me: Run) -> None:
    for pid in agent.proxy_workers():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"MIRRORD_NS_" not in f.read()
        fds = os.listdir(f"/proc/{pid}/fd")
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
        assert not any(t.endswith(("host_key", "identity")) for t in targets), targets
        assert os.readlink(f"/proc/{pid}/cwd") == "/"  # and `python -P`: nothing imported from elsewhere


# ---------------------------------------------------------------------------- the wire, alone
def test_a_hand_over_carries_the_fd_and_every_byte_read() -> None:
    from mirrord_tun.agent.steal import handoff

    ours, theirs = handoff.pair()
    a, b = socket.socketpair()
    data = os.urandom(3 * handoff.PAYLOAD + 17)  # more than one message holds
    try:
        handoff.send_adopt(theirs, 4242, a.fileno(), data, wait=5)
        adoptions, done = handoff.Adoptions(), None
        while done is None:
            got = handoff.receive(ours)
            assert got is not None
            done = adoptions.feed(*got)
        port, fd, bytes_read = done
        assert (port, bytes_read) == (4242, data)
        with socket.socket(fileno=fd) as adopted:
            b.sendall(b"still the same connection")
            assert adopted.recv(100) == b"still the same connection"
    finally:
        for s in (ours, theirs, a, b):
            s.close()


def test_a_worker_saying_nonsense_is_a_wire_error_and_leaks_no_fd() -> None:
    from mirrord_tun.agent.steal import handoff

    ours, theirs = handoff.pair()
    a, _b = socket.socketpair()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for header, payload in (({"op": handoff.MORE}, b"x"), ({"op": handoff.ADOPT, "port": 1, "size": 1 << 40}, b"")):
            handoff.send(theirs, header, payload, (a.fileno(),))
            with pytest.raises(handoff.WireError):
                got = handoff.receive(ours)
                assert got is not None
                handoff.Adoptions().feed(*got)
        theirs.sendmsg([b"\xff\xff{"])
        with pytest.raises(handoff.WireError):
            handoff.receive(ours)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for s in (ours, theirs, a, _b):
            s.close()


def test_filters_cross_the_wire_unchanged() -> None:
    from mirrord_tun.agent.steal import handoff
    from mirrord_tun.agent.steal.filters import HttpFilter

    f = HttpFilter.compile("^x-dev: me$", "(?i)^/API/", "post", (("path", "/v2"),), (("method", "GET"), ("header", "a")))
    assert handoff.filter_from_wire(json.loads(json.dumps(handoff.filter_to_wire(f)))) == f


_H2C_UPGRADE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
s.sendall(b"GET / HTTP/1.1\\r\\nHost: pod\\r\\n\\r\\n")
status, length = f.readline(), 0
while (line := f.readline()) != b"\\r\\n":
    if line.lower().startswith(b"content-length:"):
        length = int(line.split(b":")[1])
print(f.read(length).decode().strip())
s.sendall(b"GET / HTTP/1.1\\r\\nHost: pod\\r\\nConnection: Upgrade, HTTP2-Settings\\r\\nUpgrade: h2c\\r\\n"
          b"HTTP2-Settings: AAMAAABkAAQAAP__\\r\\nX-Mirrord-User: me\\r\\n\\r\\n")
head = []
while (line := f.readline()) != b"\\r\\n":
    head.append(line.decode().strip())
print(head[0], [h for h in head if h.lower().startswith("server:")][0])
"""


def test_an_h2c_upgrade_request_is_handed_over_and_still_filtered(sb: Sandbox, agent: WorkersAgent,
                                                                  steal_me: Run) -> None:
    # After a request for the pod, an upgrade to h2c for the program: it reaches the program
    # (which switches, "local-program"), whichever process accepted the connection.
    for i in range(12):
        r = sb.exec("client", sys.executable, "-c", _H2C_UPGRADE, POD, str(HTTP))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"hello from pod, you are {CLIENT}", r.stdout
        assert lines[1].startswith("HTTP/1.1 101 ") and "Server: local-program" in lines[1], r.stdout


_HELD = """
import http.client, sys
conns = [http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10) for _ in range(12)]
for c in conns:
    c.request("GET", "/")
    print(c.getresponse().read().decode().strip(), flush=True)
sys.stdin.readline()
for c in conns:
    c.auto_open = 0
    c.request("GET", "/")
    print(c.getresponse().read().decode().strip(), flush=True)
"""


def test_connections_left_to_the_pod_drain_in_the_workers_then_the_routing_goes(
        sb: Sandbox, agent: WorkersAgent, steal_me: Run) -> None:
    client = sb.start("client", [sys.executable, "-c", _HELD, POD, str(HTTP)], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE)
    try:
        assert client.stdin is not None and client.stdout is not None
        for _ in range(12):
            assert client.stdout.readline().decode().strip() == f"hello from pod, you are {CLIENT}"
        assert _workers_hold_connections(sb, agent.proxy_workers())
        steal_me.proc.send_signal(signal.SIGINT)
        steal_me.proc.wait(LIVENESS)
        assert routing_left(sb)  # the held connections still need it
        client.stdin.write(b"go\n")
        client.stdin.flush()
        for _ in range(12):  # the port was given back; these connections carry on, to the pod
            assert client.stdout.readline().decode().strip() == f"hello from pod, you are {CLIENT}"
    finally:
        sb.stop(client)
    assert wait_until(lambda: not routing_left(sb), LIVENESS)


@pytest.mark.parametrize("node, limit, want", [(1, 1, 0), (2, 2, 0), (3, 3, 1), (4, 4, 2), (8, 2, 1), (8, 8, 4),
                                               (64, 64, 4)])
def test_auto_starts_no_worker_on_two_cpus_and_one_per_usable_cpu_past_that(monkeypatch, node: int, limit: int,
                                                                             want: int) -> None:
    from mirrord_tun.agent.steal import workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(node)))
    monkeypatch.setattr(workers, "_usable_cpus", lambda cpus: min(cpus, limit))
    assert workers.auto_count() == want


# A client like `printf 'GET ...' | nc host port`: one request with Connection: close, then its
# side of the connection shut (FIN) before any answer. Prints each answer's first body line.
_HALF_CLOSE = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.create_connection((host, port), timeout=20)
    me = "X-Mirrord-User: me\\r\\n" if i % 2 else ""
    s.sendall(f"GET /{i} HTTP/1.1\\r\\nHost: pod\\r\\nConnection: close\\r\\n{me}\\r\\n".encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    print(data.partition(b"\\r\\n\\r\\n")[2].decode().strip() or "(nothing)", flush=True)
"""


def test_a_client_that_shuts_its_side_after_the_request_gets_its_answer(sb: Sandbox, agent: WorkersAgent,
                                                                         steal_me: Run) -> None:
    """nc and friends send FIN right after the request: the worker that read it hands the
    connection over with the EOF it saw, and the answer must still come back."""
    r = sb.exec("client", sys.executable, "-c", _HALF_CLOSE, POD, str(HTTP), "40", timeout=120)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    expected = [f"hello from {'local-me' if i % 2 else 'pod'}, you are {CLIENT}" for i in range(40)]
    assert answers == expected
