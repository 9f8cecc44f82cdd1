"""The local program of the mirror tests and benchmark: records what reaches it.

    recorder tcp PORT FILE [--no-read] [--ipv6]   HTTP: one JSON line per request body
    recorder udp PORT FILE                        UDP: one JSON line per datagram
    (--ipv6: listen on :: for IPv6 and IPv4 clients, the latter seen as ::ffff:A.B.C.D)
    (FILE "-": standard output, e.g. for `demo`, whose user may not write its files)

Each line holds the body's SHA-256, its length, the peer address and the time
it was complete, so a test compares what the client sent with what arrived here
and the benchmark measures how fast it arrived. `--no-read` accepts
connections and never reads them: the mirror must push back, then reset.
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

    def do_POST(self) -> None:  # noqa: N802
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
        self.end_headers()
        self.wfile.write(b"ok")

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


def main() -> None:
    kind, port, _Handler.record_to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "udp":
        _udp(port)
    elif "--no-read" in sys.argv:
        _never_read(port)
    else:
        ipv6 = "--ipv6" in sys.argv
        server = (Server6 if ipv6 else Server)(("::" if ipv6 else "0.0.0.0", port), _Handler)
        server.daemon_threads = True
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
