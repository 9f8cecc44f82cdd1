"""HTTP/2 with prior knowledge (h2c, gRPC-shaped streams) through the steal proxy: each stream
routed by the filter, one connection carrying streams for the pod and for the local program.

The servers are h2 (python-hyper) servers answering "NAME METHOD PATH LENGTH SHA256"; a
path starting /stream answers in three DATA frames and ends with gRPC-style trailers.
Clients: an h2 client on a plain socket (streams interleaved on one connection) and curl.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from typing import Iterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from test_httpsteal import HOST, TIMEOUT, Proxy
from test_steal import agent, runs, sb  # noqa: F401 - fixtures (the sandbox, for the end-to-end test)

from mirrord_tun.agent.steal.filters import HttpFilter


def _answer(name: str, method: str, path: str, body: bytes) -> bytes:
    return f"{name} {method} {path} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()


class _Serve(asyncio.Protocol):
    """HTTP/2 with prior knowledge, or through `Upgrade: h2c` from an HTTP/1.1 request (RFC 7540
    §3.2: a 101, then that request answered on stream 1); HTTP/1.1 without Upgrade is answered
    in HTTP/1.1 (`upgrade=False`: never switches, as an HTTP/1.1-only server)."""

    def __init__(self, name: str, upgrade: bool = True, max_streams: int | None = None) -> None:
        self.name, self.upgrade, self.max_streams = name, upgrade, max_streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        if self.max_streams is not None:  # enforced: one stream past it is a protocol error
            self.c.local_settings = h2.settings.Settings(
                client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        self.requests: dict[int, list] = {}
        self.http1 = b""  # bytes of an HTTP/1.1 request, until we know which protocol this is

    def data_received(self, data: bytes) -> None:
        if self.http1 is not None:
            self.http1 += data
            if self.http1.startswith(b"PRI * HTTP/2.0"[:len(self.http1)]) and len(self.http1) < 14:
                return
            if not self.http1.startswith(b"PRI * HTTP/2.0"):
                return self._http1()
            data, self.http1 = self.http1, None
            self.c.initiate_connection()
        self._h2(data)

    def _http1(self) -> None:
        if b"\r\n\r\n" not in self.http1:
            return
        head, _, rest = self.http1.partition(b"\r\n\r\n")
        line, *fields = head.decode().split("\r\n")
        method, path, _ = line.split(" ")
        headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        if not (self.upgrade and headers.get("upgrade") == "h2c" and "http2-settings" in headers):
            self.http1 = rest
            out = _answer(f"{self.name}-http1", method, path, b"")
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))  # type: ignore[attr-defined]
            return self._http1()
        length = int(headers.get("content-length", "0"))  # the upgrade request's body comes whole first
        if len(rest) < length:
            return
        self.http1 = None
        self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")  # type: ignore[attr-defined]
        self.c.initiate_upgrade_connection(headers["http2-settings"].encode())
        self._respond(1, {":method": method, ":path": path}, rest[:length])
        self._h2(rest[length:])

    def _h2(self, data: bytes) -> None:
        for e in self.c.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                self.requests[e.stream_id] = [dict(e.headers), b""]
            elif isinstance(e, h2.events.DataReceived):
                self.requests[e.stream_id][1] += e.data
                self.c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                self._respond(e.stream_id, *self.requests.pop(e.stream_id))
        self.t.write(self.c.data_to_send())  # type: ignore[attr-defined]

    def _respond(self, sid: int, headers: dict, body: bytes) -> None:
        out = _answer(self.name, headers[":method"], headers[":path"], body)
        if headers[":path"].startswith("/push") and self.c.remote_settings.enable_push:  # as servers with push do
            promised = self.c.get_next_available_stream_id()
            self.c.push_stream(sid, promised, [(":method", "GET"), (":path", "/pushed"), (":scheme", "http"),
                                               (":authority", "x")])
            self.c.send_headers(promised, [(":status", "200")])
            self.c.send_data(promised, b"p" * 40_000, end_stream=True)  # two fill a connection's first window
        streaming = headers[":path"].startswith("/stream")
        self.c.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc" if streaming else "text/plain")])
        if streaming:
            for _ in range(3):
                self.c.send_data(sid, out)
            self.c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        else:
            self.c.send_data(sid, out, end_stream=True)


def serve_forever(name: str, port: int) -> None:
    """The same server as a process (in a sandbox namespace): prints "ready" once listening."""
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Serve(name), "0.0.0.0", port)
        print("ready", flush=True)
        await server.serve_forever()
    asyncio.run(main())


class H2Server:
    def __init__(self, name: str, upgrade: bool = True, max_streams: int | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.accepted = 0  # connections
        ready = threading.Event()

        def serve() -> _Serve:
            self.accepted += 1
            return _Serve(name, upgrade, max_streams)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(self.loop.create_server(serve, HOST, 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def h2proxy() -> Iterator[Proxy]:
    pod, local = H2Server("pod"), H2Server("local")
    p = Proxy(pod.port, local.port, HttpFilter.compile("^x-dev: me$", None))
    yield p
    p.stop()
    pod.stop()
    local.stop()


def _exchange(port: int, requests: list[tuple[str, str, list[tuple[str, str]], list[bytes]]],
              host: str = HOST) -> dict[int, dict]:
    """Send every request on one connection, interleaving their DATA frames; each stream's
    response headers, body and trailers by stream id (1, 3, 5, ...)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    out: dict[int, dict] = {}
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        sids = []
        for method, path, headers, _ in requests:
            sid = c.get_next_available_stream_id()
            sids.append(sid)
            out[sid] = {"body": b"", "trailers": {}}
            c.send_headers(sid, [(":method", method), (":path", path), (":scheme", "http"),
                                 (":authority", "pod"), *headers])
        pending = [list(parts) for *_, parts in requests]
        while any(pending) or any("done" not in o for o in out.values()):
            for sid, parts in zip(sids, pending):  # one frame's worth per stream per turn
                if parts and c.local_flow_control_window(sid) >= len(parts[0]):
                    c.send_data(sid, parts.pop(0), end_stream=not parts)
                elif not parts and "sent" not in out[sid]:
                    out[sid]["sent"] = True
                    if not requests[sids.index(sid)][3]:
                        c.end_stream(sid)
            s.sendall(c.data_to_send())
            data = s.recv(65536)
            if not data:
                break
            for e in c.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    out[e.stream_id]["headers"] = dict(e.headers)
                elif isinstance(e, h2.events.DataReceived):
                    out[e.stream_id]["body"] += e.data
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, h2.events.TrailersReceived):
                    out[e.stream_id]["trailers"] = dict(e.headers)
                elif isinstance(e, h2.events.StreamEnded):
                    out[e.stream_id]["done"] = True
            s.sendall(c.data_to_send())
    return out


def test_streams_of_one_connection_go_where_their_headers_say(h2proxy: Proxy) -> None:
    big = os.urandom(300_000)  # past the 64 KiB windows: flow control end to end
    pieces = [big[i:i + 16_384] for i in range(0, len(big), 16_384)]
    requests = [
        ("GET", "/a?x=1", [("x-dev", "me")], []),
        ("POST", "/b", [("x-dev", "you")], pieces),
        ("POST", "/stream/Echo", [("x-dev", "me"), ("content-type", "application/grpc")], [b"m1", b"m2"]),
        ("POST", "/stream/Other", [("content-type", "application/grpc")], [b"p1"]),
        ("POST", "/c", [("X-DEV", "me")], pieces),
    ]
    out = _exchange(h2proxy.port, requests)
    assert out[1]["body"] == _answer("local", "GET", "/a?x=1", b"")
    assert out[3]["body"] == _answer("pod", "POST", "/b", big)
    assert out[5]["body"] == _answer("local", "POST", "/stream/Echo", b"m1m2") * 3
    assert out[5]["trailers"] == {"grpc-status": "0"}
    assert out[7]["body"] == _answer("pod", "POST", "/stream/Other", b"p1") * 3
    assert out[7]["trailers"] == {"grpc-status": "0"}
    assert out[9]["body"] == _answer("local", "POST", "/c", big)
    assert all(o.get("done") and o["headers"][":status"] == "200" for o in out.values()), out
    assert h2proxy.counters["steal_h2_streams_local"] == 3 and h2proxy.counters["steal_h2_streams_pod"] == 2
    assert h2proxy.idle()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("mine", [True, False])
def test_curl_http2_prior_knowledge(h2proxy: Proxy, mine: bool) -> None:
    r = subprocess.run(["curl", "-sS", "--fail", "--http2-prior-knowledge", "-H", "x-dev: me" if mine else "x-dev: no",
                        "--data-binary", "hello", f"http://{HOST}:{h2proxy.port}/grpc.Svc/Call"],
                       capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == _answer("local" if mine else "pod", "POST", "/grpc.Svc/Call", b"hello")


@pytest.mark.parametrize("mine", [True, False])
def test_a_server_that_pushes_never_stalls_the_connection(h2proxy: Proxy, mine: bool) -> None:
    """The proxy declares no push to its upstreams (a pushed stream answers no client request,
    and its unacknowledged DATA would use up the connection's window): a server that pushes
    40 kB with each answer when allowed serves every stream of the connection."""
    paths = [f"/push/{i}" for i in range(4)]
    out = _exchange(h2proxy.port, [("GET", p, [("x-dev", "me" if mine else "no")], []) for p in paths])
    assert [o["body"] for o in out.values()] == [_answer("local" if mine else "pod", "GET", p, b"") for p in paths]
    assert not h2proxy.failures and h2proxy.idle()


@pytest.mark.parametrize("mine", [True, False])
def test_streams_past_the_servers_concurrency_limit_wait_for_room(mine: bool) -> None:
    """The client may open as many streams as the proxy allows, more than a server that allows
    two at once: the proxy holds the rest until that server's streams end, as a client told the
    server's own limit would, all on one connection to that server, as the client's."""
    pod, local = H2Server("pod", max_streams=2), H2Server("local", max_streams=2)
    proxy = Proxy(pod.port, local.port, HttpFilter.compile("^x-dev: me$", None))
    try:
        paths = [f"/s{i}" for i in range(8)]
        # bodies in two frames, the second sent a turn later: all 8 streams are open at once
        out = _exchange(proxy.port, [("POST", p, [("x-dev", "me" if mine else "no")], [p.encode(), b"."])
                                     for p in paths])
        assert [o["body"] for o in out.values()] == [_answer("local" if mine else "pod", "POST", p, p.encode() + b".")
                                                     for p in paths]
        assert (local if mine else pod).accepted == 1  # the streams that came together share a connection
        assert proxy.idle()
    finally:
        proxy.stop()
        pod.stop()
        local.stop()


def _curl_h2c(port: int, *paths: str) -> tuple[list[str], str]:
    """curl --http2 on http:// (it asks `Upgrade: h2c` on the first request, then reuses the
    connection): each answer, and how many connections curl opened."""
    r = subprocess.run(["curl", "-sS", "--fail", "--http2", "-w", "|%{http_version} %{num_connects}\n",
                        *(f"http://{HOST}:{port}{p}" for p in paths)], capture_output=True, timeout=TIMEOUT, text=True)
    assert r.returncode == 0, r.stderr
    parts = re.findall(r"(.*)\n\|(\S+ \d+)\n", r.stdout)  # each answer ends with a newline
    assert len(parts) == len(paths), r.stdout
    return [answer for answer, _ in parts], " ".join(info for _, info in parts)


@pytest.fixture
def upgrade_proxy() -> Iterator[tuple[Proxy, H2Server]]:
    pod, local = H2Server("pod"), H2Server("local")
    p = Proxy(pod.port, local.port, HttpFilter.compile(None, "^/mine"))
    yield p, pod
    p.stop()
    pod.stop()
    local.stop()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("first", ["/mine/a", "/other/a"])
def test_curl_h2c_upgrade_is_split_per_stream(upgrade_proxy: tuple[Proxy, H2Server], first: str) -> None:
    """The upgrade request goes where the filter says and that server switches; every later
    stream on the same connection is routed by the filter on its own."""
    proxy, _ = upgrade_proxy
    paths = [first, "/mine/b", "/other/b", "/mine/c?x=1"]
    answers, info = _curl_h2c(proxy.port, *paths)
    assert answers == [_answer("local" if p.startswith("/mine") else "pod", "GET", p, b"").decode().strip()
                       for p in paths]
    assert info == "2 1 2 0 2 0 2 0", info  # HTTP/2 throughout, on one connection
    assert proxy.counters["steal_h2c_upgrades"] == 1
    assert proxy.counters["steal_h2_streams_local"] + proxy.counters["steal_h2_streams_pod"] == 3
    assert not proxy.failures and proxy.idle()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("first", ["/mine/up", "/other/up"])
def test_curl_h2c_upgrade_request_with_a_body(upgrade_proxy: tuple[Proxy, H2Server], first: str,
                                              tmp_path) -> None:
    """curl --http2 -d: the upgrade request carries a 100 kB body (sent whole before the switch,
    RFC 7540 §3.2); it and the next stream on the same connection each go where their path says."""
    proxy, _ = upgrade_proxy
    body = os.urandom(100_000)
    (tmp_path / "body").write_bytes(body)
    paths = [first, "/other/two" if first.startswith("/mine") else "/mine/two"]
    r = subprocess.run(["curl", "-sS", "--fail", "--http2", "--data-binary", f"@{tmp_path / 'body'}",
                        "-w", "%{http_version} %{num_connects}\n", *(f"http://{HOST}:{proxy.port}{p}" for p in paths)],
                       capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"".join(_answer("local" if p.startswith("/mine") else "pod", "POST", p, body) + info
                                for p, info in zip(paths, (b"2 1\n", b"2 0\n")))
    assert proxy.counters["steal_h2c_upgrades"] == 1 and not proxy.failures and proxy.idle()


# java.net.http's HttpClient asked for HTTP/2 on http://: the first request (a 100 kB POST)
# carries `Upgrade: h2c`, the next three go on the upgraded connection; x-dev alternates.
_JAVA = """
import java.net.URI;
import java.net.http.*;
import java.time.Duration;
public class H2c {
    public static void main(String[] a) throws Exception {
        HttpClient c = HttpClient.newBuilder().version(HttpClient.Version.HTTP_2).build();
        for (int i = 0; i < 4; i++) {
            HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(a[0] + "/j" + i))
                .header("x-dev", i % 2 == 0 ? "me" : "no").timeout(Duration.ofSeconds(20));
            b = i == 0 ? b.POST(HttpRequest.BodyPublishers.ofString("x".repeat(100000))) : b.GET();
            HttpResponse<String> r = c.send(b.build(), HttpResponse.BodyHandlers.ofString());
            System.out.print(r.version() + " " + r.body());
        }
    }
}
"""


@pytest.mark.skipif(not shutil.which("java"), reason="needs java (a JDK: single-file source launch)")
def test_java_httpclient_h2c_upgrade_with_a_body_then_streams_routed_apart(h2proxy: Proxy, tmp_path) -> None:
    (tmp_path / "H2c.java").write_text(_JAVA)
    # -XX:-UsePerfData: no /tmp/hsperfdata_<user> left behind by the JVM.
    r = subprocess.run(["java", "-XX:-UsePerfData", str(tmp_path / "H2c.java"), f"http://{HOST}:{h2proxy.port}"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"".join(b"HTTP_2 " + _answer(name, method, f"/j{i}", b"x" * 100_000 if i == 0 else b"")
                                for i, (name, method) in enumerate([("local", "POST"), ("pod", "GET"),
                                                                    ("local", "GET"), ("pod", "GET")]))
    assert h2proxy.counters["steal_h2c_upgrades"] == 1 and h2proxy.counters["steal_http2"] == 1


@pytest.mark.skipif(not shutil.which("h2load"), reason="needs h2load (nghttp2-client)")
@pytest.mark.parametrize("mine", [True, False])
def test_h2load_many_concurrent_streams(h2proxy: Proxy, mine: bool, tmp_path) -> None:
    """h2load: 2 connections, 100 streams in flight on each, bodies past the initial windows."""
    (tmp_path / "body").write_bytes(os.urandom(100_000))
    r = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "100", "-d", str(tmp_path / "body"),
                        "-H", "x-dev: me" if mine else "x-dev: no", f"http://{HOST}:{h2proxy.port}/load"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "400 succeeded, 0 failed, 0 errored, 0 timeout" in r.stdout, r.stdout
    assert "status codes: 400 2xx" in r.stdout, r.stdout
    assert h2proxy.counters["steal_h2_streams_local" if mine else "steal_h2_streams_pod"] == 400


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_h2c_upgrade_to_an_http1_only_server_stays_http1() -> None:
    """A server that ignores the Upgrade answers in HTTP/1.1, and so does the proxy's client."""
    pod, local = H2Server("pod", upgrade=False), H2Server("local", upgrade=False)
    proxy = Proxy(pod.port, local.port, HttpFilter.compile(None, "^/mine"))
    try:
        answers, info = _curl_h2c(proxy.port, "/other", "/mine")
        assert answers == [_answer("pod-http1", "GET", "/other", b"").decode().strip(),
                           _answer("local-http1", "GET", "/mine", b"").decode().strip()]
        assert info.split()[::2] == ["1.1", "1.1"], info
        assert proxy.counters["steal_h2c_upgrades"] == 0 and not proxy.failures
    finally:
        proxy.stop()
        pod.stop()
        local.stop()


# ---------------------------------------------------------------------------- end to end
H2_PORT = 9090
_IMPORT = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "


def test_h2_streams_routed_by_the_agent_end_to_end(sb, agent, runs) -> None:  # noqa: F811
    """Through the real agent (transparent connections from the client's address) and `run`."""
    from conftest import wait_until
    from test_steal import LIVENESS, POD, Run
    from mirrord_tun.sandbox import PY

    pod_server = sb.start_ready("pod", [*PY, "-c", _IMPORT + f"import test_steal_h2 as t; t.serve_forever('pod', {H2_PORT})"])
    try:
        run = Run(sb, [*PY, "-c", _IMPORT + f"import test_steal_h2 as t; t.serve_forever('local', {H2_PORT})"],
                  "--port", str(H2_PORT), "--http-header-filter", "^x-dev: me$", name="h2")
        runs.append(run)
        exchange = _IMPORT + ("import json, test_steal_h2 as t; out = t._exchange_at(sys.argv[1], int(sys.argv[2])); "
                              "print(json.dumps(out))")

        def routed() -> list:
            r = sb.exec("client", *PY, "-c", exchange, POD, str(H2_PORT))
            return json.loads(r.stdout) if r.returncode == 0 else [r.stderr]
        want = [_answer("local", "GET", "/a", b"").decode(), _answer("pod", "GET", "/b", b"").decode(),
                (_answer("local", "POST", "/stream/S", b"xy") * 3).decode()]
        assert wait_until(lambda: routed() == want, LIVENESS, 0.5), (routed(), run.log())
    finally:
        sb.stop(pod_server)


def _exchange_at(host: str, port: int) -> list[str]:
    out = _exchange(port, [("GET", "/a", [("x-dev", "me")], []), ("GET", "/b", [], []),
                           ("POST", "/stream/S", [("x-dev", "me")], [b"x", b"y"])], host)
    return [o["body"].decode() for o in out.values()]

