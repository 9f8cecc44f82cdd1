"""Request smuggling through the steal proxy, from the attacker's side (RFC 9112 §6.3, §5.2).

The attacker sends one request whose framing two parsers could read differently, hiding a
second request in it that would then reach the laptop's program (or the pod) without
passing the filter. Behind the proxy stand naive servers that frame by Content-Length
alone and ignore Transfer-Encoding (as Python's http.server does), so whatever the proxy
forwarded of such a request would show as an extra request there. The proxy must answer
400 and forward nothing of it.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Iterator

import pytest

from test_httpsteal import HOST, TIMEOUT, Proxy, _recv_all

from mirrord_tun.agent.steal.filters import HttpFilter

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Dev: me\r\n\r\n"


class LengthOnlyServer:
    """Frames requests by Content-Length alone; records the raw bytes and each request line."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.raw = bytearray()
        self.lines: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError, ValueError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.raw.extend(data)
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.lines.append(head.split(b"\r\n")[0])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.raw.extend(data)
                    buf += data
                buf = buf[length:]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.name), self.name))

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def naive() -> Iterator[tuple[LengthOnlyServer, LengthOnlyServer, Proxy]]:
    pod, local = LengthOnlyServer("pod"), LengthOnlyServer("local")
    proxy = Proxy(pod.port, local.port, HttpFilter.compile("^x-dev: me$", None))
    yield pod, local, proxy
    proxy.stop()
    pod.stop()
    local.stop()


def _send(port: int, data: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        return _recv_all(s)


ATTACKS = {
    "CL.TE": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"0\r\n\r\n" + SMUGGLED,
    "TE.CL": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n"
             b"0\r\n\r\n" + SMUGGLED,
    "two lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 48\r\n\r\n" + SMUGGLED,
    "length list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 48\r\n\r\n" + SMUGGLED,
    "signed length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +48\r\n\r\n" + SMUGGLED,
    "TE not chunked last": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"0\r\n\r\n" + SMUGGLED,
    "TE twice": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
                b"0\r\n\r\n" + SMUGGLED,
    "TE space before colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n x-dev: me\r\n\r\n",
    "obs-fold tab": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tContent-Length: 48\r\n\r\n" + SMUGGLED,
    "bare LF head": b"GET / HTTP/1.1\nHost: x\nX-Dev: me\n\n",
    "bare LF in one line": b"GET / HTTP/1.1\r\nHost: x\nX-Dev: me\r\n\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: x\rX-Dev: me\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"10000000000000000000030\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "chunk longer than its size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1\r\nab\r\n0\r\n\r\n" + SMUGGLED,
    "chunk size with LF only": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"0\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
def test_ambiguous_framing_is_answered_400_and_never_forwarded(naive, attack: str) -> None:
    pod, local, proxy = naive
    out = _send(proxy.port, ATTACKS[attack])
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert out.count(b"HTTP/1.1") == 1, out  # one answer: nothing after it was read as a request
    assert pod.raw == b"" and local.raw == b"", (pod.raw, local.raw)
    assert proxy.counters["steal_bad_requests"] == 1
    assert proxy.idle()


@pytest.mark.parametrize("attack", ["CL.TE", "obs-fold", "bare LF in one line", "chunk longer than its size"])
def test_after_good_requests_the_bad_one_ends_the_connection_and_reaches_no_one(naive, attack: str) -> None:
    pod, local, proxy = naive
    good = [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\nX-Dev: me\r\n\r\n"]
    out = _send(proxy.port, b"".join(good) + ATTACKS[attack])
    assert out.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\npod"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlocal"), out
    assert out.count(b"HTTP/1.1 400 ") == 1, out
    assert (bytes(pod.raw), bytes(local.raw)) == (good[0], good[1])
    assert (pod.lines, local.lines) == ([b"GET /a HTTP/1.1"], [b"GET /b HTTP/1.1"])


def test_a_head_that_never_ends_is_refused_at_the_cap(naive) -> None:
    pod, local, proxy = naive
    out = _send(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert pod.raw == b"" and local.raw == b""


def test_a_slow_head_is_cut_at_its_deadline(naive) -> None:
    pod, local, _ = naive
    slow = Proxy(pod.port, local.port, HttpFilter.compile("^x-dev: me$", None), head_timeout=0.5)
    try:
        with socket.create_connection((HOST, slow.port), timeout=TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            out = _recv_all(s)
        assert out.startswith(b"HTTP/1.1 408 "), out
        assert pod.raw == b"" and local.raw == b""
        assert slow.counters["steal_head_timeouts"] == 1
    finally:
        slow.stop()
