"""Filtered steal: the proxy's sockets in the pod's namespace (listeners, transparent connects).

Owns: making the listening sockets of a pod port (one set per serving process, on one port),
and `Connector`, which opens a transparent connection from a client's address with sockets
made in the pod's namespace ahead of need. Used by the agent (proxy.py) and by its proxy
workers (worker.py) alike; the nft table and routes that make transparent sockets work are
proxy.py's.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
from typing import Awaitable, Callable

from mirrord_tun.agent.steal.upstream import Link

IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST, at SOL_IPV6
LISTEN_ATTEMPTS = 8  # an IPv4 listener's port may be taken for IPv6: another pick
CONNECT_TIMEOUT = 5.0
SPARE_SOCKETS = 16


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _stream(family: socket.AddressFamily) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def listening_sockets(copies: int = 1) -> list[list[socket.socket]]:
    """`copies` sets of listeners on one free port, one set per process that accepts (the agent
    and its proxy workers; SO_REUSEPORT spreads new connections over them when there are
    several): an IPv4 listener and, where the namespace has IPv6, an IPv6-only one on the same
    port, so one port map serves the redirects of both families."""
    for _ in range(LISTEN_ATTEMPTS):
        made: list[list[socket.socket]] = []
        try:
            port = 0
            for _copy in range(copies):
                made.append(_listeners(port, copies > 1))
                port = made[0][0].getsockname()[1]
            return made
        except BaseException as e:
            for sock in (s for group in made for s in group):
                sock.close()
            if not (isinstance(e, OSError) and e.errno == errno.EADDRINUSE):
                raise
    raise OSError(errno.EADDRINUSE, "no port free for both IPv4 and IPv6")


def _listeners(port: int, shared: bool) -> list[socket.socket]:
    made = [_stream(socket.AF_INET)]
    try:
        with contextlib.suppress(OSError):  # no IPv6 in this kernel: IPv4 only
            made.append(_stream(socket.AF_INET6))
            made[1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for sock in made:
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        made[0].bind(("0.0.0.0", port))
        if len(made) > 1:
            made[1].bind(("::", made[0].getsockname()[1]))
        for sock in made:
            sock.listen(1024)
        return made
    except BaseException:
        for sock in made:
            sock.close()
        raise


def new_sockets(n: int, family: socket.AddressFamily) -> list[socket.socket]:
    """In the pod's namespace, which a socket keeps for life: the rest of its set-up is done
    on the event loop, so a new connection costs no trip to the namespace's thread."""
    return [_stream(family) for _ in range(n)]


def _make_transparent(sock: socket.socket, mark: int, source: str, avoid_port: int) -> bool:
    """Bind `sock` to the client's (foreign) address, on any port but `avoid_port` (the
    redirected connection's 4-tuple is the pod-bound one's too); False if it got that one."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    return sock.getsockname()[1] != avoid_port


def original_destination(sock: socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET6:  # a sockaddr_in6: family, port, flow info, address
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def _connected_at_once(sock: socket.socket, dest: tuple[str, int]) -> bool:
    """Start a non-blocking connect; True if it completed inside the call. To the pod's own
    server (this namespace) the kernel runs the whole handshake within connect(), so the loop's
    sock_connect under a timeout (a writer, a future, a timer: ~40 us of CPU more per connection,
    measured) is needed only for the tunnel's side and for a server slow to answer."""
    err = sock.connect_ex(dest)
    if err == errno.EINPROGRESS:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            return False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return True


async def _connect_done(loop: asyncio.AbstractEventLoop, sock: socket.socket, dest: tuple[str, int]) -> None:
    """Wait for a connect already started: the loop's sock_connect calls connect() again, which
    says EALREADY while it runs and EISCONN if it completed in between (done, then)."""
    try:
        await loop.sock_connect(sock, dest)
    except OSError as e:
        if e.errno != errno.EISCONN:
            raise


# Makes n sockets of a family in the pod's namespace.
Maker = Callable[[int, socket.AddressFamily], Awaitable[list[socket.socket]]]


class Connector:
    """Transparent connections from a client's address, with spare sockets made ahead of need."""

    def __init__(self, make: Maker) -> None:
        self._make = make
        self._spare: dict[socket.AddressFamily, list[socket.socket]] = {socket.AF_INET: [], socket.AF_INET6: []}
        self._refill: dict[socket.AddressFamily, asyncio.Task[None]] = {}

    async def connect(self, mark: int, source: str, avoid_port: int, dest: tuple[str, int],
                      factory: Callable[[], Link]) -> asyncio.BaseTransport:
        for _ in range(3):
            sock = await self._socket(family_of(source))
            try:
                if _make_transparent(sock, mark, source, avoid_port):
                    loop = asyncio.get_running_loop()
                    if not _connected_at_once(sock, dest):
                        async with asyncio.timeout(CONNECT_TIMEOUT):
                            await _connect_done(loop, sock, dest)
                    transport, _ = await loop.create_connection(factory, sock=sock)
                    return transport
            except BaseException:
                sock.close()
                raise
            sock.close()
        raise OSError(errno.EADDRINUSE, "no free source port")

    def close_spares(self) -> None:
        for spare in self._spare.values():
            while spare:
                spare.pop().close()

    async def _socket(self, family: socket.AddressFamily) -> socket.socket:
        spare, refill = self._spare[family], self._refill.get(family)
        if len(spare) < SPARE_SOCKETS // 2 and (refill is None or refill.done()):
            self._refill[family] = asyncio.create_task(self._add_spares(family))
        if spare:
            return spare.pop()
        return (await self._make(1, family))[0]

    async def _add_spares(self, family: socket.AddressFamily) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # out of fds; the agent ending: made when needed
            spare = self._spare[family]
            spare += await self._make(SPARE_SOCKETS - len(spare), family)
