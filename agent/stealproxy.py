"""Filtered steal: one listener per pod port, each request routed by the sessions' HTTP filters.

Each session stealing pod port P with a filter has, in its own nft table, a
REDIRECT of new connections to the pod's addresses on P onto the port of P's
listener (a timeout map refreshed with the rest of the steal: the dead-man
switch). The listener is shared by every session filtering P: redirects of
several tables all lead to it, the first one that matches does the NAT. The
listener only serves connections that were redirected from P (SO_ORIGINAL_DST),
so a neighbour calling the listener's own port gets nothing.

Every request goes through httpsteal.proxy_connection; `PortProxy.choose` tries
the sessions' filters in the order they came and names the first match's opener,
or the pod. Both openers connect transparently, from the client's real address:

- to the pod's server (the original destination): an IP_TRANSPARENT socket bound
  to (client address, 0) (port 0: the redirected connection's own 4-tuple must not
  be reused) and marked POD_MARK. A route chain copies the mark onto the
  connection (ct mark) and back onto the server's replies, and a rule sends marked
  packets to a table whose only route is `local 0.0.0.0/0`: replies come up to our
  socket instead of leaving for the client, as in mirror/delivery.py. The chains
  are in a table of their own (NFT_TABLE), there while any listener or connection is.
- to the session's program, through its TUN: marked LOCAL_MARK, which its table's
  output chain lets open connections to that session's filtered local ports only.
  Replies come back through the TUN, are given POD_MARK in prerouting by their ct
  mark and so are delivered locally too. The program sees the client's address.

When a session leaves, the connections that ever sent it a request end; the
others go on, also when it was the last session on the port: its listener stops
accepting (no redirect leads there any more) and its remaining connections, all
to the pod, run until their clients close them. Then the rule and route go
(remove_routing; dataplane.remove_leftovers also removes them once no table of
ours is left, after a killed agent). Several agents in one pod share the rule.

Not HTTP/1.x (HTTP/2 prior knowledge, TLS, other protocols) goes to the pod
untouched, as does everything when no filter matches.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import struct
from typing import Awaitable, Callable


from mirrord_tun.agent.httpsteal import (CHUNK, Chooser, HttpFilter, Opener, Reader, RequestHead, Writer,
                                         proxy_connection)
from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns import routes

log = logging.getLogger("mirrord-ns.agent")
POD_MARK = 0x6D726E70  # "mrnp": our transparent connections; the rule sending replies to them is the one with it
LOCAL_MARK = 0x6D726E6C  # "mrnl": our connections into a session's TUN
NFT_TABLE = "mirrord_ns_proxy"  # not a session table (dataplane._SESSION_TABLE): removed with the routing
TUNNELS = "mrd*"  # every session's TUN (dataplane.TUN_PREFIX)
RULE_PRIORITY = 100
IP_TRANSPARENT = 19
SO_ORIGINAL_DST = 80
CONNECT_TIMEOUT = 5.0
SPARE_SOCKETS = 16


def _nft_table() -> str:
    # Its own table, not the sessions': connections draining after the last session left need it.
    return (
        f"table ip {NFT_TABLE}\nflush table ip {NFT_TABLE}\n"  # not delete: 0.3 ms instead of ~15 when absent
        f"table ip {NFT_TABLE} {{\n"
        "  chain output {\n"
        "    type route hook output priority mangle; policy accept;\n"
        f"    meta mark {{ {POD_MARK}, {LOCAL_MARK} }} ct mark set meta mark\n"
        f"    ct mark {POD_MARK} meta mark set ct mark\n"
        "  }\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f'    iifname "{TUNNELS}" ct mark {LOCAL_MARK} meta mark set {POD_MARK}\n'
        "  }\n"
        # Empty, but a nat chain: when the last one in the namespace goes, the kernel stops
        # translating every NATed connection, and draining ones were redirected.
        "  chain nat {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        "  }\n}\n"
    )


def install_routing() -> None:
    """Runs in the pod's namespace; idempotent; `remove_routing` is its undo."""
    nft.run(_nft_table())
    routes.add_local_delivery(POD_MARK, RULE_PRIORITY)


def remove_routing() -> None:
    """Runs in the pod's namespace: exactly what install_routing added, found by its markers."""
    nft.delete_table("ip", NFT_TABLE)
    routes.remove_local_delivery(POD_MARK)


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _new_sockets(n: int) -> list[socket.socket]:
    """In the pod's namespace, which a socket keeps for life: the rest of its set-up is done
    on the event loop, so a new connection costs no trip to the namespace's thread."""
    return [socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            for _ in range(n)]


def _make_transparent(sock: socket.socket, mark: int, source: str, avoid_port: int) -> bool:
    """Bind `sock` to the client's (foreign) address, on any port but `avoid_port` (the
    redirected connection's 4-tuple is the pod-bound one's too); False if it got that one."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    return sock.getsockname()[1] != avoid_port


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


class Route:
    """One session's filter on one port, and the client connections that sent it requests."""

    def __init__(self, holder: str, http_filter: HttpFilter, client: str, local: int) -> None:
        self.holder, self.filter, self.client, self.local = holder, http_filter, client, local
        self.connections: set[asyncio.Task[None]] = set()


Connect = Callable[[int, str, int, tuple[str, int]], Awaitable[tuple[Reader, Writer]]]


class PortProxy:
    """The listener of one pod port and the sessions' filters on it."""

    def __init__(self, port: int, server: asyncio.Server, listen_port: int, connect: Connect,
                 counters: collections.Counter, on_idle: Callable[["PortProxy"], None]) -> None:
        self.port, self.server, self.listen_port = port, server, listen_port
        self._connect, self._counters, self._on_idle = connect, counters, on_idle
        self.routes: list[Route] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False  # no longer accepting; its connections may still run (to the pod)

    async def handle(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            sock = writer.get_extra_info("socket")
            dest, peer = original_destination(sock), writer.get_extra_info("peername")
            if dest[1] != self.port or dest == writer.get_extra_info("sockname")[:2]:
                self._counters["steal_not_redirected"] += 1  # someone called the listener's own port
                writer.transport.abort()
                return

            async def pod() -> tuple[Reader, Writer]:
                return await self._connect(POD_MARK, peer[0], peer[1], dest)

            choose = self._chooser(task, peer)
            await proxy_connection((reader, writer), choose, pod, self._counters)
        except OSError as e:
            log.debug("steal proxy on port %d: %s", self.port, e)
            writer.transport.abort()
        finally:
            self.tasks.discard(task)
            for route in self.routes:
                route.connections.discard(task)
            if self.closed and not self.tasks:
                self._on_idle(self)

    def _chooser(self, task: asyncio.Task[None], peer: tuple[str, int]) -> Chooser:
        # One opener per route for this connection: the proxy keys its upstreams by opener.
        openers: dict[int, Opener] = {}

        def choose(head: RequestHead) -> Opener | None:
            for route in self.routes:
                if route.filter.matches(head):
                    route.connections.add(task)
                    opener = openers.get(id(route))
                    if opener is None:
                        opener = openers[id(route)] = self._local_opener(route, peer)
                    return opener
            return None

        return choose

    def _local_opener(self, route: Route, peer: tuple[str, int]) -> Opener:
        async def opener() -> tuple[Reader, Writer]:
            return await self._connect(LOCAL_MARK, peer[0], peer[1], (route.client, route.local))
        return opener

    def drop(self, holder: str) -> list[asyncio.Task[None]]:
        """Forget `holder`'s route; returns the connections that sent it requests, to be ended."""
        doomed = [t for r in self.routes if r.holder == holder for t in r.connections if not t.done()]
        self.routes = [r for r in self.routes if r.holder != holder]
        return doomed


class Proxies:
    """The agent's filtered-steal listeners, by pod port; sessions join and leave them."""

    def __init__(self, ns: NetNs) -> None:
        self._ns = ns
        self._ports: dict[int, PortProxy] = {}
        self._draining: set[PortProxy] = set()  # closed, with connections left (that go to the pod)
        self._lock = asyncio.Lock()
        self._routed = False
        self._unrouting: asyncio.Task[None] | None = None
        self._spare: list[socket.socket] = []  # made in the namespace ahead of need
        self._refill: asyncio.Task[None] | None = None
        self.counters: collections.Counter = collections.Counter()

    async def join(self, holder: str, client: str, wanted: dict[int, tuple[HttpFilter, int]]) -> dict[int, int]:
        """Add (or replace) `holder`'s filters on these pod ports (port -> (filter, local port));
        returns each port's listener port, for the redirect."""
        async with self._lock:
            if wanted and not self._routed:
                await self._ns.acall(install_routing)
                self._routed = True
            out = {}
            for port, (http_filter, local) in wanted.items():
                proxy = self._ports.get(port) or await self._listen(port)
                ended = proxy.drop(holder)  # a changed filter or local port: its connections end
                proxy.routes.append(Route(holder, http_filter, client, local))
                await _end(ended)
                out[port] = proxy.listen_port
            return out

    async def leave(self, holder: str, keep: frozenset[int] = frozenset()) -> None:
        """Remove `holder`'s filters but those on `keep` ports; a port left without any closes."""
        async with self._lock:
            for port, proxy in list(self._ports.items()):
                if port in keep:
                    continue
                await _end(proxy.drop(holder))
                if not proxy.routes:
                    del self._ports[port]
                    proxy.closed = True
                    proxy.server.close()
                    log.info("filtered steal: pod port %d given back", proxy.port)
                    if proxy.tasks:
                        self._draining.add(proxy)
            await self._unroute_if_idle()

    def _idle(self, proxy: PortProxy) -> None:
        if proxy in self._draining:
            self._draining.discard(proxy)
            self._unrouting = asyncio.get_running_loop().create_task(self._unroute_when_free())

    async def _unroute_when_free(self) -> None:
        async with self._lock:
            try:
                await self._unroute_if_idle()
            except RuntimeError as e:  # the agent is ending (its namespace thread is gone): leftovers, then
                log.debug("filtered steal: routing left for the next agent: %s", e)

    async def _unroute_if_idle(self) -> None:
        # The rule also carries the replies of connections still draining.
        if self._routed and not self._ports and not self._draining:
            await self._ns.acall(remove_routing)
            self._routed = False
            spare, self._spare = self._spare, []
            for sock in spare:
                sock.close()

    async def _listen(self, port: int) -> PortProxy:
        sock = await self._ns.acall(_listening_socket)
        listen_port = sock.getsockname()[1]
        holder: list[PortProxy] = []
        server = await asyncio.start_server(lambda r, w: holder[0].handle(r, w), sock=sock, limit=CHUNK)
        proxy = PortProxy(port, server, listen_port, self._connect, self.counters, self._idle)
        holder.append(proxy)
        self._ports[port] = proxy
        log.info("filtered steal: pod port %d served by the proxy on port %d", port, listen_port)
        return proxy

    async def _connect(self, mark: int, source: str, avoid_port: int, dest: tuple[str, int]) -> tuple[Reader, Writer]:
        for _ in range(3):
            sock = await self._socket()
            try:
                if _make_transparent(sock, mark, source, avoid_port):
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await asyncio.get_running_loop().sock_connect(sock, dest)
                    return await asyncio.open_connection(sock=sock, limit=CHUNK)
            except BaseException:
                sock.close()
                raise
            sock.close()
        raise OSError(errno.EADDRINUSE, "no free source port")

    async def _socket(self) -> socket.socket:
        if len(self._spare) < SPARE_SOCKETS // 2 and (self._refill is None or self._refill.done()):
            self._refill = asyncio.create_task(self._add_spares())
        if self._spare:
            return self._spare.pop()
        return (await self._ns.acall(_new_sockets, 1))[0]

    async def _add_spares(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # out of fds; the agent ending: made when needed
            self._spare += await self._ns.acall(_new_sockets, SPARE_SOCKETS - len(self._spare))


async def _end(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
