"""Filtered steal end to end: per HTTP request, the program under `run --steal
--http-header-filter` answers the requests that match, the pod's own server the rest.

The pod (198.18.0.10) serves HTTP on 80 (the sandbox server: "hello from pod, you are
ADDR"; a POST body's SHA-256 "from ADDR"). The program answers as "local-NAME", also for
POSTs, takes chunked bodies and WebSocket-style upgrades (101, then echoes with a prefix).
Give-back times are printed (run with -s); the only bounds are liveness bounds.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import kill_pids, leftovers, run_env, wait_until
import test_steal as steal
from test_steal import HTTP, LIVENESS, POD, Agent, Run, agent, runs, sb  # noqa: F401 - fixtures

from mirrord_tun.sandbox import ADDRS, PY, Sandbox

CLIENT = ADDRS["client"]
ME = "x-mirrord-user: me"

# The program: like the sandbox server, but says it is local-NAME everywhere, reads chunked
# bodies, and switches protocols on `Upgrade` (then echoes each chunk with "NAME:" in front).
_LOCAL = """
import hashlib, http.server, sys
name = sys.argv[1]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "local-program"

    def answer(self, text):
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(65536):
                self.connection.sendall(name.encode() + b":" + data)
            self.close_connection = True
            return
        self.answer(f"hello from local-{name}, you are {self.client_address[0]}\\n")

    def do_POST(self):
        h = hashlib.sha256()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0], 16)):
                h.update(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\\r\\n", b""):
                pass
        else:
            h.update(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.answer(f"local-{name} {h.hexdigest()} from {self.client_address[0]}\\n")

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"""

# One keep-alive connection: alternating matching and other requests, GETs and POSTs with
# random bodies; prints one JSON list of (status, body, connection reused) per request.
_KEEP_ALIVE = """
import http.client, json, os, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
out = []
for i in range(8):
    headers = {"x-mirrord-user": "me"} if i % 2 == 0 else {}
    if i % 4 < 2:
        c.request("GET", f"/{i}", headers=headers)
    else:
        body = os.urandom(200_000 + i)
        c.request("POST", f"/{i}", body=body, headers=headers)
        out.append(("sent", __import__("hashlib").sha256(body).hexdigest()))
    r = c.getresponse()
    out.append((r.status, r.read().decode(), c.sock is not None))
print(json.dumps(out))
"""

_CHUNKED = """
import http.client, os, sys, hashlib
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
parts = [os.urandom(n) for n in (1, 70_000, 3, 300_000)]
c.request("POST", "/chunked", body=iter(parts), headers={"x-mirrord-user": "me"}, encode_chunked=True)
r = c.getresponse()
print(hashlib.sha256(b"".join(parts)).hexdigest(), r.read().decode().strip())
"""

_UPGRADE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: pod\\r\\nX-Mirrord-User: me\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(4096)
s.sendall(b"ping")
got = b""
while len(got) < len(b"me:ping"):
    got += s.recv(4096)
print(head.split(b"\\r\\n")[0].decode(), got.decode())
"""

_NOT_HTTP = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(bytes([0x16, 3, 1, 0, 5]) + b"\\x01\\x02\\x03\\x04\\x05\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode("latin-1"))
"""


# Two keep-alive connections, one with a matching request, one without; after a line on
# stdin, one more unmatched request on each: prints what became of each.
_TWO_CONNECTIONS = """
import http.client, sys
conns = [http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10) for _ in range(2)]
for c, headers in zip(conns, ({"x-mirrord-user": "me"}, {})):
    c.request("GET", "/", headers=headers)
    print(c.getresponse().read().decode().strip(), flush=True)
sys.stdin.readline()
for c in conns:
    c.auto_open = 0  # a closed connection must show, not be reopened
    try:
        c.request("GET", "/")
        print(c.getresponse().read().decode().strip(), flush=True)
    except (OSError, http.client.HTTPException) as e:
        print("ended", type(e).__name__, flush=True)
"""


def client_py(sb: Sandbox, code: str, port: int = HTTP) -> str:
    r = sb.exec("client", sys.executable, "-c", code, POD, str(port))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def get(sb: Sandbox, *headers: str) -> str:
    r = sb.exec("client", "curl", "-sS", "--max-time", "3", *(a for h in headers for a in ("-H", h)),
                f"http://{POD}:{HTTP}/")
    return r.stdout.strip() if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def filtered(sb: Sandbox, runs: list[Run], name: str = "me", header: str = ME, *more: str) -> Run:
    """The program under run --steal --http-header-filter `header`, once matching requests reach it."""
    r = Run(sb, [*PY, "-c", _LOCAL, name, str(HTTP)], "--http-header-filter", header, *more, name=name)
    runs.append(r)
    assert wait_until(lambda: get(sb, header).startswith(f"hello from local-{name}"), LIVENESS, 0.2), r.log()
    return r


def pod_state(sb: Sandbox) -> str:
    """The pod namespace's nft ruleset and policy rules: what a refused run must leave as it was."""
    return sb.exec("pod", "nft", "list", "ruleset").stdout + sb.exec("pod", "ip", "rule").stdout


def routing_left(sb: Sandbox) -> bool:
    return "0x6d726e70" in sb.exec("pod", "ip", "rule").stdout


def given_back_after(sb: Sandbox, start: float, what: str) -> float:
    """test_steal's, asked with a matching request: those too must reach the pod again."""
    return steal.given_back_after(sb, start, f"{what} (matching requests)", lambda: get(sb, ME))


@pytest.fixture
def steal_me(sb: Sandbox, agent: Agent, runs: list[Run]) -> Iterator[Run]:  # noqa: F811
    yield filtered(sb, runs)


def test_one_keep_alive_connection_alternates_between_program_and_pod(sb: Sandbox, steal_me: Run) -> None:
    out = json.loads(client_py(sb, _KEEP_ALIVE))
    answers = iter(out)
    for i in range(8):
        sent = next(answers)[1] if i % 4 >= 2 else None
        status, body, reused = next(answers)
        body = body.strip()
        assert status == 200 and reused, (i, out)
        who = "local-me" if i % 2 == 0 else "pod"
        if sent is None:
            assert body == f"hello from {who}, you are {CLIENT}", (i, out)
        elif who == "pod":  # the pod's server saw the client's own address: a transparent connect
            assert body == f"{sent} from {CLIENT}", (i, out)
        else:
            assert body == f"local-me {sent} from {CLIENT}", (i, out)


def test_a_chunked_body_reaches_the_program_whole(sb: Sandbox, steal_me: Run) -> None:
    sent, *answer = client_py(sb, _CHUNKED).split()
    assert answer == ["local-me", sent, "from", CLIENT]


def test_an_upgrade_goes_where_its_headers_say_and_becomes_a_byte_stream(sb: Sandbox, steal_me: Run) -> None:
    assert client_py(sb, _UPGRADE) == "HTTP/1.1 101 Switching Protocols me:ping"


def test_a_client_that_does_not_speak_http_reaches_the_pod_untouched(sb: Sandbox, steal_me: Run) -> None:
    answer = client_py(sb, _NOT_HTTP)
    # The pod's server (the program would have said local-me) got the bytes as sent.
    assert r"Bad request syntax ('\x16\x03\x01\x00\x05\x01\x02\x03\x04\x05')" in answer, answer


def test_two_sessions_with_different_filters_each_get_theirs(sb: Sandbox, steal_me: Run, runs: list[Run]) -> None:
    you = filtered(sb, runs, "you", "x-mirrord-user: you")
    for _ in range(3):
        assert get(sb, ME) == f"hello from local-me, you are {CLIENT}"
        assert get(sb, "x-mirrord-user: you") == f"hello from local-you, you are {CLIENT}"
        assert get(sb) == f"hello from pod, you are {CLIENT}"
    you.proc.send_signal(signal.SIGINT)
    you.proc.wait(LIVENESS)
    assert wait_until(lambda: get(sb, "x-mirrord-user: you") == f"hello from pod, you are {CLIENT}", LIVENESS)
    assert get(sb, ME) == f"hello from local-me, you are {CLIENT}"  # the other session keeps the listener


def test_a_whole_port_steal_of_a_filtered_port_is_refused(sb: Sandbox, steal_me: Run) -> None:
    marker = Path(sb.dir) / "whole-started"
    argv = sb.run_args("touch", str(marker))
    argv[argv.index("--"):argv.index("--")] = ["--steal", "--port", str(HTTP)]
    p = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=LIVENESS)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("mirrord-ns: cannot steal tcp/80: tcp port 80 has filtered steals by session "), p.stderr
    assert len(p.stderr.splitlines()) == 1 and not marker.exists()
    assert get(sb, ME) == f"hello from local-me, you are {CLIENT}"


@pytest.mark.parametrize("option", ["--http-header-filter", "--http-path-filter"])
def test_a_bad_regex_is_one_line_and_changes_nothing_in_the_pod(sb: Sandbox, agent: Agent, option: str) -> None:  # noqa: F811
    before = pod_state(sb)
    argv = sb.run_args("true")
    argv[argv.index("--"):argv.index("--")] = ["--steal", option, "(unclosed"]
    p = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=LIVENESS)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and option in p.stderr, p.stderr
    assert "regex" in p.stderr, p.stderr
    assert pod_state(sb) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_the_port_comes_back_when_run_ends(sb: Sandbox, steal_me: Run, sig: signal.Signals) -> None:
    start = time.monotonic()
    steal_me.kill() if sig == signal.SIGKILL else steal_me.proc.send_signal(sig)
    given_back_after(sb, start, f"{sig.name} of run")
    assert wait_until(lambda: not leftovers(sb) and not routing_left(sb), LIVENESS), leftovers(sb)


def test_the_port_comes_back_when_the_agent_worker_is_killed(sb: Sandbox, agent: Agent, steal_me: Run) -> None:  # noqa: F811
    worker = agent.worker()
    start = time.monotonic()
    kill_pids([worker])
    given_back_after(sb, start, "kill -9 of the agent worker (its guard cleans up)")
    agent.guard.wait(LIVENESS)
    assert leftovers(sb) == [] and not routing_left(sb)


def test_the_port_comes_back_when_every_agent_process_is_killed(sb: Sandbox, agent: Agent,  # noqa: F811
                                                                steal_me: Run) -> None:
    steal.kill_every_agent_process(sb, agent, lambda: get(sb, ME))
    assert any("mirrord_ns_" in item for item in leftovers(sb))  # still there, but inert
    agent.restart()  # a new agent removes the tables and the policy routing
    assert wait_until(lambda: not leftovers(sb) and not routing_left(sb), LIVENESS), leftovers(sb)


def test_when_a_session_leaves_only_the_connections_it_served_end(sb: Sandbox, steal_me: Run) -> None:
    client = sb.start("client", [sys.executable, "-c", _TWO_CONNECTIONS, POD, str(HTTP)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().decode().strip() == f"hello from local-me, you are {CLIENT}"
    assert client.stdout.readline().decode().strip() == f"hello from pod, you are {CLIENT}"
    steal_me.proc.send_signal(signal.SIGINT)
    steal_me.proc.wait(LIVENESS)
    client.stdin.write(b"go\n")
    client.stdin.flush()
    assert client.stdout.readline().decode().startswith("ended ")
    assert client.stdout.readline().decode().strip() == f"hello from pod, you are {CLIENT}"
    sb.stop(client)
