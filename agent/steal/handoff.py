"""The wire between the agent and its steal proxy workers: small typed messages on a
SOCK_SEQPACKET socketpair, file descriptors alongside (SCM_RIGHTS).

Owns: the message kinds, their encoding, and the filters' form on the wire.
agent -> worker: LISTEN (a pod port's listening sockets, as fds), ROUTES (the filters on it and
  the families each session's tunnel carries), CLOSE (stop accepting; connections drain).
worker -> agent: ADOPT (a client connection's fd and the bytes the worker read of it and did not
  forward; bytes past one message follow in MORE messages), DRAINED (a closed port's last
  connection in that worker ended).
A message: a 2-byte header length, a JSON header {"op": ...}, then raw payload bytes. Each side
is ours (the worker is the agent's own child and holds no secret), but the agent still checks
what a worker says: an unknown kind or a truncated message ends that worker.
"""
from __future__ import annotations

import array
import json
import re
import select
import socket
import struct
import time
from typing import Any

from mirrord_tun.agent.steal.filters import HttpFilter

LISTEN, ROUTES, CLOSE, ADOPT, MORE, DRAINED = "listen", "routes", "close", "adopt", "more", "drained"
MAX_MESSAGE = 65536
PAYLOAD = MAX_MESSAGE - 512  # raw bytes per message; a header is far smaller
MAX_FDS = 4  # a port's listeners: IPv4 and IPv6
MAX_ADOPT = 4 * 1024 * 1024  # bytes read of a handed-over connection: a head and a read or two past it


class WireError(ValueError):
    """A message that does not parse: its sender is broken."""


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"", fds: tuple[int, ...] = (),
         wait: float = 0) -> None:
    """One message; BlockingIOError if the peer's queue is full (net.unix.max_dgram_qlen
    messages: 10 by default) for longer than `wait` seconds."""
    head = json.dumps(header).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    deadline = time.monotonic() + wait
    while True:
        try:
            sock.sendmsg([struct.pack("!H", len(head)) + head + payload], ancillary)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            select.select([], [sock], [], left)


def send_adopt(sock: socket.socket, listen_port: int, fd: int, data: bytes, wait: float) -> None:
    send(sock, {"op": ADOPT, "port": listen_port, "size": len(data)}, data[:PAYLOAD], (fd,), wait)
    for at in range(PAYLOAD, len(data), PAYLOAD):
        send(sock, {"op": MORE}, data[at:at + PAYLOAD], wait=wait)


def receive(sock: socket.socket) -> tuple[dict[str, Any], bytes, list[int]] | None:
    """One message (header, payload, fds), None at EOF; BlockingIOError when none is there."""
    msg, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_DONTWAIT)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", data[:len(data) - len(data) % 4]).tolist()
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise WireError("truncated message")
        if not msg:
            return None
        (size,) = struct.unpack_from("!H", msg)
        header = json.loads(msg[2:2 + size])
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise WireError("no message kind")
        return header, msg[2 + size:], fds
    except (WireError, ValueError, struct.error) as e:
        for fd in fds:
            socket.close(fd)
        raise WireError(str(e)) from None


class Adoptions:
    """An ADOPT and its MORE messages put together: (port, fd, bytes) once all are in."""

    def __init__(self) -> None:
        self._open: tuple[int, int, int, bytearray] | None = None  # port, fd, size, bytes so far

    def feed(self, header: dict[str, Any], payload: bytes, fds: list[int]) -> tuple[int, int, bytes] | None:
        if header["op"] == ADOPT and len(fds) == 1 and self._open is None and 0 <= int(header["size"]) <= MAX_ADOPT:
            self._open = (int(header["port"]), fds[0], int(header["size"]), bytearray(payload))
        elif header["op"] == MORE and not fds and self._open is not None:
            self._open[3].extend(payload)
        else:
            for fd in fds:
                socket.close(fd)
            raise WireError(f"unexpected {header['op']!r}")
        port, fd, size, data = self._open
        if len(data) < size:
            return None
        self._open = None
        if len(data) > size:
            socket.close(fd)
            raise WireError("more bytes than announced")
        return port, fd, bytes(data)

    def close(self) -> None:
        if self._open is not None:
            socket.close(self._open[1])
            self._open = None


def filter_to_wire(f: HttpFilter) -> dict[str, Any]:
    def pattern(p: re.Pattern[str] | None) -> list[Any] | None:
        return None if p is None else [p.pattern, p.flags]
    return {"header": pattern(f.header), "path": pattern(f.path), "method": f.method,
            "all_of": [filter_to_wire(g) for g in f.all_of], "any_of": [filter_to_wire(g) for g in f.any_of]}


def filter_from_wire(d: dict[str, Any]) -> HttpFilter:
    def pattern(p: list[Any] | None) -> re.Pattern[str] | None:
        return None if p is None else re.compile(p[0], p[1])
    return HttpFilter(pattern(d["header"]), pattern(d["path"]), d["method"],
                      tuple(filter_from_wire(g) for g in d["all_of"]), tuple(filter_from_wire(g) for g in d["any_of"]))
