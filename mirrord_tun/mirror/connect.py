"""Opening the local sockets that carry mirrored traffic: transparent ones, bound to the client's
address and port, and a TCP connect to the program retried while it restarts.

They are made in the local namespace (which owns the pod's addresses on `lo`), so
the program sees the real client's address as the source.
"""
from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

from mirrord_tun.mirror.reassembly import Flow
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.pump import Counters

IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75  # the latter is missing from Python's socket module
CONNECT_RETRY_FOR = 30.0  # a refused connect (program restarting) is retried this long
CONNECT_RETRY_FIRST = 0.1
CONNECT_RETRY_MAX = 2.0


def transparent_socket(kind: int, family: int = socket.AF_INET) -> socket.socket:
    """Runs in the local namespace: a socket may bind the client's (foreign) address."""
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def address_family(flow: Flow) -> int:
    return socket.AF_INET6 if ":" in flow.client else socket.AF_INET


async def connect(ns: NetNs, flow: Flow, port: int, counters: Counters, done: Callable[[], bool]) -> socket.socket:
    """A connected socket from the client's address:port to the program's `port`; raises the
    OSError of the last try. `done`: the connection is no longer wanted (no more retries)."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + CONNECT_RETRY_FOR
    delay = CONNECT_RETRY_FIRST
    while True:
        try:
            return await _connect_once(ns, flow, port)
        except OSError as e:
            # Refused: the program is restarting. Not available: our previous connection on this
            # port pair is still closing (a new connection after the program closed one).
            if done() or not isinstance(e, ConnectionRefusedError) and e.errno != errno.EADDRNOTAVAIL:
                raise
            if loop.time() + delay > give_up_at:
                raise
            counters["mirror_connect_retries"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)


async def _connect_once(ns: NetNs, flow: Flow, port: int) -> socket.socket:
    sock = await ns.acall(transparent_socket, socket.SOCK_STREAM, address_family(flow))
    try:
        sock.bind((flow.client, flow.cport))
        await asyncio.get_running_loop().sock_connect(sock, (flow.pod, port))
    except BaseException:
        sock.close()
        raise
    return sock
