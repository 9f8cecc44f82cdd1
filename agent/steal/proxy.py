"""Filtered steal: one listener per pod port, each request routed by the sessions' HTTP filters.

Owns: one listener per filtered pod port, the choice of upstream for each connection
(`PortProxy.choose`), and the shared table NFT_TABLE with its policy rule and route.
May touch: sockets in the pod's namespace, that table and rule; never a session's own
table (rules.py writes those). HTTP itself is http1.py's and http2.py's.

Each session stealing pod port P with a filter has, in its own nft table, a
REDIRECT of new connections to the pod's addresses on P onto the port of P's
listener (a timeout map refreshed with the rest of the steal: the dead-man
switch). The listener is shared by every session filtering P: redirects of
several tables all lead to it, the first one that matches does the NAT. The
listener only serves connections that were redirected from P (SO_ORIGINAL_DST),
so a neighbour calling the listener's own port gets nothing.

Every connection is an http1.HttpProxy; `PortProxy.choose` tries
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

IPv6: each listener has an IPv6 socket (IPV6_V6ONLY) on the same port as its
IPv4 one, so the ip6 tables' redirects use the same port map; the openers use
IPV6_TRANSPARENT sockets, an IPv6 connection goes only to a session whose tunnel
carries IPv6, and the chains and the rule have IPv6 twins (an `ip6` table of the
same name, `ip -6 rule`), installed when the first such session filters.

Not HTTP/1.x (HTTP/2 prior knowledge, TLS, other protocols) goes to the pod
untouched, as does everything when no filter matches.

With proxy workers (workers.py; `agent --steal-proxy-workers`), each listener has
one copy per worker on its port; a worker serves what goes to the pod and hands a
connection back here (`Proxies._adopt`) at its first request for a session. A
closed port's routing then also waits for the workers' connections (DRAINED).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import resource
import socket
from typing import Awaitable, Callable

from mirrord_tun.agent.steal.filters import HttpFilter
from mirrord_tun.agent.steal.framing import MAX_HEAD
from mirrord_tun.agent.steal.upstream import Link
from mirrord_tun.agent.steal.http1 import Chooser, HttpProxy, Opener, RequestHead
from mirrord_tun.agent.steal.sockets import Connector, family_of, listening_sockets, new_sockets, original_destination
from mirrord_tun.agent.steal.workers import WorkerPool
from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns import routes

log = logging.getLogger("mirrord-ns.agent")
POD_MARK = 0x6D726E70  # "mrnp": our transparent connections; the rule sending replies to them is the one with it
LOCAL_MARK = 0x6D726E6C  # "mrnl": our connections into a session's TUN
NFT_TABLE = "mirrord_ns_proxy"  # not a session table (dataplane._SESSION_TABLE): removed with the routing
TUNNELS = "mrd*"  # every session's TUN (dataplane.TUN_PREFIX)
RULE_PRIORITY = 100
MAX_PROXIED, MAX_PROXIED_PER_SOURCE = 4096, 1024  # connections: see connection_caps
FD_RESERVE = 256  # fds left to SSH, sessions and the admission caps
MIN_CAP = 16
# Memory a proxied connection may hold at once: its head (up to MAX_HEAD) as read and as parsed,
# and its transports; measured 127 KiB each under a flood of unfinished 60 KiB heads.
PER_CONNECTION = 2 * MAX_HEAD + 32 * 1024
MEMORY_RESERVE = 128 * 1024 * 1024  # the guard and the worker themselves, sessions, mirror buffers
# The container's memory limit, cgroup v2 then v1: past it the kernel kills the agent (OOMKilled).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def connection_caps() -> tuple[int, int]:
    """(per source, in all) the connections a session's redirect sends the proxy at once, from
    the fds this process may hold (server._raise_fd_limit ran): each costs up to two, and
    SSH sessions and the admission caps need the rest. Past either cap, connections go to
    the pod's server directly, in the kernel (rules.declarations): a flood costs us nothing
    more, and the pod sees what it would without a session."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    total = min(MAX_PROXIED, (nofile - FD_RESERVE) // 3)
    limit = memory_limit()
    if limit is not None:
        # In Kubernetes the agent's Job has a memory limit: a neighbour's flood of unfinished
        # heads from two pods got it OOMKilled, and the session with it.
        total = min(total, (limit - MEMORY_RESERVE) // PER_CONNECTION)
    total = max(MIN_CAP, total)
    return max(MIN_CAP, min(MAX_PROXIED_PER_SOURCE, total // 2)), total


def memory_limit() -> int | None:
    """This container's memory limit in bytes; None if it has none."""
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 1 << 60 else None  # "max", or v1's huge "none"
    return None


def _nft_table(family: str) -> str:
    # Its own table, not the sessions': connections draining after the last session left need it.
    return (
        f"table {family} {NFT_TABLE}\nflush table {family} {NFT_TABLE}\n"  # not delete: 0.3 ms instead of ~15 when absent
        f"table {family} {NFT_TABLE} {{\n"
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


def install_routing(ipv6: bool) -> None:
    """Runs in the pod's namespace; idempotent (also to add IPv6 later); `remove_routing` is its undo."""
    nft.run(_nft_table("ip") + (_nft_table("ip6") if ipv6 else ""))
    routes.add_local_delivery(POD_MARK, RULE_PRIORITY)
    if ipv6:
        routes.add_local_delivery(POD_MARK, RULE_PRIORITY, socket.AF_INET6)


def remove_routing() -> None:
    """Runs in the pod's namespace: exactly what install_routing added, found by its markers."""
    nft.delete_table("ip", NFT_TABLE)
    if nft.tables("ip6", NFT_TABLE):  # asked first: a kernel without IPv6 has no ip6 family to delete from
        nft.delete_table("ip6", NFT_TABLE)
    routes.remove_local_delivery(POD_MARK)


class Route:
    """One session's filter on one port, and the client connections that sent it requests;
    `clients`: the session's tunnel address by family (IPv6 only when it carries IPv6)."""

    def __init__(self, holder: str, http_filter: HttpFilter, clients: dict[int, str], local: int) -> None:
        self.holder, self.filter, self.clients, self.local = holder, http_filter, clients, local
        self.connections: set[HttpProxy] = set()


# (mark, client address, port to avoid, destination, protocol factory): a connected transport.
Connect = Callable[[int, str, int, tuple[str, int], Callable[[], Link]], Awaitable[asyncio.BaseTransport]]


class PortProxy:
    """The listener of one pod port and the sessions' filters on it."""

    def __init__(self, port: int, servers: list[asyncio.Server], listen_port: int, connect: Connect,
                 counters: collections.Counter, on_idle: Callable[["PortProxy"], None]) -> None:
        self.port, self.servers, self.listen_port = port, servers, listen_port
        self._connect, self._counters, self._on_idle = connect, counters, on_idle
        self.routes: list[Route] = []
        self.tasks: set[HttpProxy] = set()  # its client connections
        self.closed = False  # no longer accepting; its connections may still run (to the pod)
        self.remote = 0  # proxy workers still serving connections of it once closed

    def connection(self, first: bytes = b"") -> HttpProxy:
        """The protocol of one accepted connection (`first`: bytes a proxy worker read of it)."""
        return HttpProxy(self._setup, self._counters, self._closed, first=first)

    def _setup(self, transport: asyncio.Transport) -> tuple[Chooser, Opener] | None:
        conn = transport.get_protocol()
        assert isinstance(conn, HttpProxy)
        self.tasks.add(conn)
        try:
            dest, peer = original_destination(transport.get_extra_info("socket")), transport.get_extra_info("peername")
        except OSError as e:
            log.debug("steal proxy on port %d: %s", self.port, e)
            return None
        if dest[1] != self.port or dest == transport.get_extra_info("sockname")[:2]:
            self._counters["steal_not_redirected"] += 1  # someone called the listener's own port
            return None

        async def pod(factory: Callable[[], Link]) -> asyncio.BaseTransport:
            return await self._connect(POD_MARK, peer[0], peer[1], dest, factory)

        return self._chooser(conn, peer), pod

    def _closed(self, conn: HttpProxy) -> None:
        self.tasks.discard(conn)
        for route in self.routes:
            route.connections.discard(conn)
        self.check_idle()

    def check_idle(self) -> None:
        if self.closed and not self.tasks and not self.remote:
            self._on_idle(self)

    def _chooser(self, conn: HttpProxy, peer: tuple[str, int]) -> Chooser:
        # One opener per route for this connection: the proxy keys its upstreams by opener.
        openers: dict[int, Opener] = {}

        family = family_of(peer[0])

        def choose(head: RequestHead) -> Opener | None:
            for route in self.routes:
                # A session whose tunnel lacks the client's family cannot take its connection.
                if family in route.clients and route.filter.matches(head):
                    route.connections.add(conn)
                    opener = openers.get(id(route))
                    if opener is None:
                        opener = openers[id(route)] = self._local_opener(route, peer)
                    return opener
            return None

        return choose

    def _local_opener(self, route: Route, peer: tuple[str, int]) -> Opener:
        async def opener(factory: Callable[[], Link]) -> asyncio.BaseTransport:
            dest = (route.clients[family_of(peer[0])], route.local)
            return await self._connect(LOCAL_MARK, peer[0], peer[1], dest, factory)
        return opener

    def drop(self, holder: str) -> list[HttpProxy]:
        """Forget `holder`'s route; returns the connections that sent it requests, to be ended."""
        doomed = [c for r in self.routes if r.holder == holder for c in r.connections]
        self.routes = [r for r in self.routes if r.holder != holder]
        return doomed


class Proxies:
    """The agent's filtered-steal listeners, by pod port; sessions join and leave them. With
    `workers` (workers.py), that many more processes accept each port's connections too."""

    def __init__(self, ns: NetNs, workers: int | None = None) -> None:
        self._ns = ns
        self._ports: dict[int, PortProxy] = {}
        self._draining: set[PortProxy] = set()  # closed, with connections left (that go to the pod)
        self._lock = asyncio.Lock()
        self._routed = self._routed6 = False  # install_routing done (with IPv6)
        self._unrouting: asyncio.Task[None] | None = None
        self._connector = Connector(lambda n, family: ns.acall(new_sockets, n, family))
        self._pool = WorkerPool(ns.fd, self._adopt, self._drained, workers)
        self.counters: collections.Counter = collections.Counter()

    async def join(self, holder: str, clients: dict[int, str],
                   wanted: dict[int, tuple[HttpFilter, int]]) -> dict[int, int]:
        """Add (or replace) `holder`'s filters on these pod ports (port -> (filter, local port));
        `clients`: its tunnel address by family. Returns each port's listener port, for the redirect."""
        async with self._lock:
            ipv6 = socket.AF_INET6 in clients
            if wanted and (not self._routed or (ipv6 and not self._routed6)):
                await self._ns.acall(install_routing, ipv6 or self._routed6)
                self._routed, self._routed6 = True, ipv6 or self._routed6
            out = {}
            for port, (http_filter, local) in wanted.items():
                proxy = self._ports.get(port) or await self._listen(port)
                ended = proxy.drop(holder)  # a changed filter or local port: its connections end
                proxy.routes.append(Route(holder, http_filter, clients, local))
                self._pool.routes(proxy.listen_port, [(r.filter, list(r.clients)) for r in proxy.routes])
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
                if proxy.routes:
                    self._pool.routes(proxy.listen_port, [(r.filter, list(r.clients)) for r in proxy.routes])
                    continue
                del self._ports[port]
                proxy.closed = True
                for server in proxy.servers:
                    server.close()
                proxy.remote = self._pool.close(proxy.listen_port)
                log.info("filtered steal: pod port %d given back", proxy.port)
                if proxy.tasks or proxy.remote:
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
            self._routed = self._routed6 = False
            self._connector.close_spares()

    async def _listen(self, port: int) -> PortProxy:
        self._pool.start()
        groups = await self._ns.acall(listening_sockets, 1 + self._pool.live())
        socks, listen_port = groups[0], groups[0][0].getsockname()[1]
        holder: list[PortProxy] = []
        servers = []
        try:
            for sock in socks:
                servers.append(await asyncio.get_running_loop().create_server(lambda: holder[0].connection(),
                                                                              sock=sock))
        except BaseException:
            for server in servers:
                server.close()
            for sock in [*socks[len(servers):], *(s for group in groups[1:] for s in group)]:
                sock.close()
            raise
        proxy = PortProxy(port, servers, listen_port, self._connector.connect, self.counters, self._idle)
        holder.append(proxy)
        self._ports[port] = proxy
        self._pool.listen(listen_port, port, groups[1:])  # closes our copies of the workers' sockets
        log.info("filtered steal: pod port %d served by the proxy on port %d", port, listen_port)
        return proxy

    def _find(self, listen_port: int) -> PortProxy | None:
        return next((p for p in [*self._ports.values(), *self._draining] if p.listen_port == listen_port), None)

    def _adopt(self, listen_port: int, sock: socket.socket, first: bytes) -> None:
        """A connection a proxy worker handed over (a request for a session, HTTP/2): served here
        from `first`, the bytes it read and did not forward."""
        proxy = self._find(listen_port)
        if proxy is None:  # its port closed meanwhile (and drained): nothing serves it any more
            sock.close()
            return
        self.counters["steal_adopted"] += 1
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(lambda: proxy.connection(first), sock=sock))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or sock.close())

    def _drained(self, listen_port: int) -> None:
        proxy = self._find(listen_port)
        if proxy is not None and proxy.remote:
            proxy.remote -= 1
            proxy.check_idle()


async def _end(conns: list[HttpProxy]) -> None:
    for conn in conns:
        conn.abort()  # their links close with them, in connection_lost
