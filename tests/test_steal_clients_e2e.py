"""Filtered steal end to end with real clients and servers the other steal tests do not use.

The pod (198.18.0.10) and the program under `run --steal --http-header-filter "x-dev: me"`
run the same aiohttp server (NAME pod or local): it answers "NAME METHOD PATH LENGTH SHA256",
speaks WebSocket on /ws (the server greets first, then echoes), streams server-sent events
on /sse, sends MB megabytes on /big?mb=MB, refuses `Expect: 100-continue` on /reject with
417, and closes keep-alive connections idle for IDLE seconds, as servers do. The pod serves
the same on DIRECT, a port nobody steals: what a client sees there is what it would see
without a session. The pod also serves TLS (openssl s_server) on 8080, an HTTP port by
default that the program serves too. Every client runs once with a request that matches
(answered by local) and once with one that does not (the pod).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import leftovers, wait_until
from test_steal import HTTP, LIVENESS, POD, Agent, Run

from mirrord_tun.sandbox import PY, Sandbox

DIRECT, TLS = 81, 8080
IDLE = 1.0
ME, OTHER = "x-dev: me", "x-dev: someone-else"

_SERVER = """
import asyncio, hashlib, sys
from aiohttp import web

name = sys.argv[1]

def say(request, body=b""):
    return f"{name} {request.method} {request.path_qs} {len(body)} {hashlib.sha256(body).hexdigest()}\\n"

async def index(request):
    return web.Response(text=say(request, await request.read()))

async def ws(request):
    w = web.WebSocketResponse()
    await w.prepare(request)
    await w.send_str(f"{name}:hello")
    async for msg in w:
        if msg.type == web.WSMsgType.TEXT:
            await w.send_str(f"{name}:{msg.data}")
        elif msg.type == web.WSMsgType.BINARY:
            await w.send_bytes(name.encode() + b":" + msg.data)
    return w

async def sse(request):
    r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await r.prepare(request)
    for i in range(3):
        await r.write(f"data: {name} {i}\\n\\n".encode())
        await asyncio.sleep(0.2)
    await r.write_eof()
    return r

async def big(request):
    r = web.StreamResponse()
    r.content_length = int(request.query["mb"]) << 20
    await r.prepare(request)
    chunk = name[0].encode() * (1 << 20)
    for _ in range(int(request.query["mb"])):
        await r.write(chunk)
    return r

async def refuse(request):
    return web.Response(status=417, text="no\\n")

app = web.Application(client_max_size=1 << 30)
app.router.add_route("*", "/ws", ws)
app.router.add_get("/sse", sse)
app.router.add_get("/big", big)
app.router.add_post("/reject", index, expect_handler=refuse)
app.router.add_route("*", "/{tail:.*}", index)

async def main():
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=%s)
    await runner.setup()
    for port in sys.argv[2:]:
        await web.TCPSite(runner, "0.0.0.0", int(port)).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
""" % IDLE


def _answer(name: str, method: str, path: str, body: bytes = b"") -> str:
    return f"{name} {method} {path} {len(body)} {hashlib.sha256(body).hexdigest()}"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Agent]]:
    """The sandbox with the pod's servers, an agent and the filtered run, for the whole module."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN, nft)")
    box = Sandbox()
    run: Run | None = None
    try:
        box.build()
        box.start_ready("pod", [*PY, "-c", _SERVER, "pod", str(HTTP), str(DIRECT)])
        certs = tmp_path_factory.mktemp("tls")
        key, cert = certs / "key.pem", certs / "cert.pem"
        made = box.exec("pod", "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=pod", "-days", "1", "-keyout", str(key), "-out", str(cert))
        assert made.returncode == 0, made.stderr
        box.start("pod", ["openssl", "s_server", "-quiet", "-www", "-accept", str(TLS), "-key", str(key),
                          "-cert", str(cert)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        agent = Agent(box)
        run = Run(box, [*PY, "-c", _SERVER, "local", str(HTTP), str(TLS)], "--http-header-filter", f"^{ME}$",
                  name="clients")
        assert wait_until(lambda: _curl(box, "-H", ME, f"/ready").startswith("local "), LIVENESS, 0.2), run.log()
        assert wait_until(lambda: "tcp/8080" in run.log(), LIVENESS, 0.2), run.log()
        yield box, agent
        run.close()
        run = None
        box.stop(agent.guard)
        assert wait_until(lambda: not leftovers(box), LIVENESS), leftovers(box)
    finally:
        if run is not None:
            run.close()
        box.close()


@pytest.fixture
def sb(session: tuple[Sandbox, Agent]) -> Sandbox:
    return session[0]


def _curl(sb: Sandbox, *args: str, port: int = HTTP) -> str:
    """curl from the client namespace; `args` starting with / (but /dev/) are paths on the pod's `port`."""
    argv = [f"http://{POD}:{port}{a}" if a.startswith("/") and not a.startswith("/dev/") else a for a in args]
    r = sb.exec("client", "curl", "-sS", "--max-time", "20", *argv)
    return r.stdout if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def _py(sb: Sandbox, code: str, *args: str, stdin: str | None = None) -> str:
    r = sb.exec("client", sys.executable, "-c", code, POD, *args, timeout=60, input=stdin)
    assert r.returncode == 0, r.stderr
    return r.stdout


ROUTES = [pytest.param(ME, "local", id="matching"), pytest.param(OTHER, "pod", id="other")]

# WebSocket with aiohttp's client: the handshake routed by its headers, then frames both
# ways (the server's first); then plain requests on the session's kept-alive connections,
# matching and not. Prints JSON: the messages, then who answered each request.
_WEBSOCKET = """
import asyncio, json, sys
import aiohttp

async def main(host, port, header):
    name, value = header.split(": ")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://{host}:{port}/ws", headers={name: value}) as w:
            got = [(await w.receive()).data]
            for m in ("a", "b" * 100_000):
                await w.send_str(m)
                got.append((await w.receive()).data[:12])
            await w.send_bytes(bytes(range(256)))
            got.append((await w.receive()).data.hex()[:20])
        who = []
        for i in range(4):
            async with s.get(f"http://{host}:{port}/k{i}", headers={name: value if i % 2 else "x"}) as r:
                who.append((await r.text()).split()[0])
    print(json.dumps([got, who]))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.parametrize("header,name", ROUTES)
def test_websocket_with_aiohttp_routed_on_its_handshake(sb: Sandbox, header: str, name: str) -> None:
    got, who = json.loads(_py(sb, _WEBSOCKET, str(HTTP), header))
    assert got == [f"{name}:hello", f"{name}:a", f"{name}:{'b' * 12}"[:12],
                   (name.encode() + b":" + bytes(range(256))).hex()[:20]]
    # the session's pool reused its connections: requests mixed, each where its header says
    assert who == ["pod", name, "pod", name]


@pytest.mark.parametrize("header,name", ROUTES)
def test_expect_100_continue_and_a_417_refusal(sb: Sandbox, header: str, name: str, tmp_path: Path) -> None:
    body = os.urandom(2 << 20)  # curl asks `Expect: 100-continue` past 1 MiB
    (tmp_path / "body").write_bytes(body)
    post = ["-H", header, "--data-binary", f"@{tmp_path / 'body'}"]
    assert _curl(sb, *post, "/up").strip() == _answer(name, "POST", "/up", body)
    # aiohttp answers 417 at once; curl then sends the body all the same, which aiohttp reads as a
    # second request (400): the same statuses through the proxy as without it
    statuses = [re.findall(r"^HTTP/1\.1 (\d+)", _curl(sb, *post, "-D", "-", "-o", "/dev/null", "/reject", port=port),
                           re.M) for port in (DIRECT, HTTP)]
    assert statuses[0][0] == "417" and statuses[1] == statuses[0], statuses


@pytest.mark.parametrize("header,name", ROUTES)
def test_head_sse_options_and_absolute_form(sb: Sandbox, header: str, name: str) -> None:
    head = _curl(sb, "-I", "-H", header, "/h1", "/h2")
    assert head.count("HTTP/1.1 200 OK") == 2 and f"Content-Length: {len(_answer(name, 'HEAD', '/h1')) + 1}" in head
    assert _curl(sb, "-N", "-H", header, "/sse") == "".join(f"data: {name} {i}\n\n" for i in range(3))
    options = ["-i", "-X", "OPTIONS", "--request-target", "*", "-H", header, "/"]
    # The whole answer, as the pod's server gives it without the proxy, but for the clock: sb.exec reads
    # text, so the CRLFs are newlines already, and the two requests may fall in different seconds.
    undated = [re.sub(r"^Date: .*\n", "", _curl(sb, *options, port=port), flags=re.M) for port in (HTTP, DIRECT)]
    assert undated[0] == undated[1] and undated[0].startswith("HTTP/1.1 "), undated
    absolute = _curl(sb, "-H", header, "--request-target", f"http://{POD}/abs?q=1", "/")
    assert absolute.strip() == _answer(name, "GET", "/abs?q=1")


# Raw socket: stdin written at once, then read until the server closes.
_RAW = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(sys.stdin.buffer.read())
out = b""
while data := s.recv(65536):
    out += data
sys.stdout.write(out.decode("latin-1"))
"""


def test_pipelined_requests_in_one_write_answered_in_order(sb: Sandbox) -> None:
    requests = (f"GET /1 HTTP/1.1\r\nHost: pod\r\n{ME}\r\n\r\n"
                "GET /2 HTTP/1.1\r\nHost: pod\r\n\r\n"
                f"POST /3 HTTP/1.1\r\nHost: pod\r\n{ME}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
                "POST /4 HTTP/1.1\r\nHost: pod\r\nContent-Length: 3\r\n\r\nxyz"
                f"GET /5 HTTP/1.0\r\nConnection: keep-alive\r\n{ME}\r\n\r\n"
                "GET /6 HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
    out = _py(sb, _RAW, str(HTTP), stdin=requests)
    assert re.findall(r"^(?:local|pod) .*$", out, re.M) == [
        _answer("local", "GET", "/1"), _answer("pod", "GET", "/2"), _answer("local", "POST", "/3", b"abc"),
        _answer("pod", "POST", "/4", b"xyz"), _answer("local", "GET", "/5"), _answer("pod", "GET", "/6")]


# A 100 MB answer read slowly (a small receive buffer, pauses): prints the bytes read and
# the agent worker's resident memory growth (kB) seen while it flowed.
_SLOW = """
import socket, sys, time
host, port, header, worker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rss():
    with open(f"/proc/{worker}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
s.settimeout(60)
s.connect((host, port))
s.sendall(f"GET /big?mb=100 HTTP/1.1\\r\\nHost: pod\\r\\n{header}\\r\\nConnection: close\\r\\n\\r\\n".encode())
before, peak, got, n = rss(), 0, 0, 0
while data := s.recv(256 * 1024):
    got += len(data)
    n += 1
    if n % 64 == 0:
        time.sleep(0.02)
        peak = max(peak, rss())
print(got, peak - before)
"""


@pytest.mark.parametrize("header,name", ROUTES)
def test_a_100_mb_answer_to_a_slow_reader_holds_bounded_memory(session: tuple[Sandbox, Agent], header: str,
                                                                name: str) -> None:
    sb, agent = session
    got, growth = map(int, _py(sb, _SLOW, str(HTTP), header, str(agent.worker())).split())
    head = len("HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n")
    assert got > 100 << 20 and got - (100 << 20) < head + 200
    print(f"\n100 MB to a slow reader ({name}): the agent worker's RSS grew {growth} kB")
    assert growth < 32 << 10, f"the agent grew {growth} kB while a 100 MB answer waited for its reader"


# One keep-alive request, then waits: prints the answer's last line and what came next
# ("closed" when the server's idle close reached the client).
_IDLE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(f"GET /idle HTTP/1.1\\r\\nHost: pod\\r\\n{sys.argv[3]}\\r\\n\\r\\n".encode())
first = s.recv(65536).decode()
try:
    print(first.splitlines()[-1], "closed" if s.recv(65536) == b"" else "data")
except OSError as e:
    print(first.splitlines()[-1], type(e).__name__)
"""


@pytest.mark.parametrize("header,name", ROUTES)
def test_a_server_closing_idle_keep_alives_closes_the_clients_too(sb: Sandbox, header: str, name: str) -> None:
    assert _py(sb, _IDLE, str(DIRECT), header).strip() == f"{_answer('pod', 'GET', '/idle')} closed"
    assert _py(sb, _IDLE, str(HTTP), header).strip() == f"{_answer(name, 'GET', '/idle')} closed"


def test_tls_on_a_filtered_port_reaches_the_pods_server_untouched(sb: Sandbox) -> None:
    r = sb.exec("client", "openssl", "s_client", "-quiet", "-connect", f"{POD}:{TLS}", "-servername", "pod",
                input="GET / HTTP/1.0\r\nx-dev: me\r\n\r\n", timeout=30)
    # s_server -www answers with its own status page: the handshake and the request went to it
    assert "HTTP/1.0 200 ok" in r.stdout and "s_server" in r.stdout, (r.stdout[-500:], r.stderr[-500:])
