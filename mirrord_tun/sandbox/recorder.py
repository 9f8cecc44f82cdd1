"""The local program of the mirror tests and benchmark: records what reaches it.

    recorder tcp PORT FILE [--no-read] [--ipv6] [--close-every N] [--delay S]
                                                  HTTP: one JSON line per request body
    recorder udp PORT FILE                        UDP: one JSON line per datagram
    (--ipv6: listen on :: for IPv6 and IPv4 clients, the latter seen as ::ffff:A.B.C.D)
    (FILE "-": standard output, e.g. for `demo`, whose user may not write its files)

Each line holds the body's SHA-256, its length, the peer address and the time
it was complete, so a test compares what the client sent with what arrived here
and the benchmark measures how fast it arrived. `--no-read` accepts
connections and never reads them: the mirror must push back, then reset.
`--close-every N` closes each connection after its Nth answer, as nginx does
after `keepalive_requests`; `--delay S` waits S seconds before reading each
request, a program slower than the pod.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import sys
import threading
import time

from mirrord_tun.sandbox.http_server import Server, Server6

_lock = threading.Lock()


def _record(to: str, **fields: object) -> None:
    line = json.dumps(fields) + "\n"
    with _lock:
        if to == "-":
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        with open(to, "a") as f:
            f.write(line)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    record_to = ""
    close_every = 0
    delay = 0.0
    answered = 0  # on this connection (one handler per connection)

    def do_POST(self) -> None:  # noqa: N802
        time.sleep(self.delay)
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        got = 0
        while got < n:
            chunk = self.rfile.read(min(n - got, 1 << 16))
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        _record(self.record_to, sha=h.hexdigest(), len=got, peer=self.client_address[0],
                path=self.path, complete=got == n, at=time.time())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.answered += 1
        if self.answered == self.close_every:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._headers_buffer.append(b"\r\nok")  # headers and body in one write, as nginx does
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def log_message(self, *args: object) -> None:
        pass


def _never_read(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), backlog=128)
    print("ready", flush=True)
    held = []
    while True:
        conn, peer = srv.accept()
        held.append(conn)  # kept open, never read
        _record(_Handler.record_to, accepted=peer[0])


def _udp(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65536)
        _record(_Handler.record_to, sha=hashlib.sha256(data).hexdigest(), len=len(data), peer=peer[0],
                at=time.time())
        sock.sendto(b"local:" + data, peer)  # an answer the mirror must absorb


def _option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    kind, port, _Handler.record_to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "udp":
        _udp(port)
    elif "--no-read" in sys.argv:
        _never_read(port)
    else:
        ipv6 = "--ipv6" in sys.argv
        _Handler.close_every = int(_option("--close-every", "0"))
        _Handler.delay = float(_option("--delay", "0"))
        server = (Server6 if ipv6 else Server)(("::" if ipv6 else "0.0.0.0", port), _Handler)
        server.daemon_threads = True
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
