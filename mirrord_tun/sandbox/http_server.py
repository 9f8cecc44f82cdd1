"""A tiny HTTP service for the sandbox: tells the caller which address it came from.

GET / answers "hello from NAME, you are ADDR"; any body sent is counted and its
SHA-256 returned, so tests can check what crossed the tunnel.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mirrord-ns-sandbox"
    # Headers and body go out in two writes: without this, Nagle holds the body for a round trip,
    # which a tunnel carrying TCP end to end pays in full (and a proxy ending TCP nearer does not).
    disable_nagle_algorithm = True

    def _answer(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            return
        self._answer(f"hello from {self.server.name}, you are {self.client_address[0]}\n")  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            h.update(chunk)
            n -= len(chunk)
        self._answer(f"{h.hexdigest()} from {self.client_address[0]}\n")

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    """Also the recorder's. A real server's backlog: socketserver's 5 overflowed now and then
    under the mirror tests' 20 clients at once (TcpExtListenOverflows 2 in 600 POSTs; 0 with 128)."""
    request_queue_size = 128


class Server6(Server):
    address_family = socket.AF_INET6


def main() -> None:
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server_class = Server6 if ":" in host else Server
    server = server_class((host, port), Handler)
    server.name = name  # type: ignore[attr-defined]
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
