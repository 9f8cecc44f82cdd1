"""Steal: new connections to the pod's stolen ports handed to the session's client, in the kernel.

Owns: the steal part of each session's nft tables (port maps, sets, chains) and their
refresh (the dead-man switch), the `Registry` of who steals which port, `SessionSteal`.
May touch: nft (netns.nft), conntrack (stolen connections reset on the way out), and
proxy.py's listeners, which it asks for; never a connection's bytes.

Each session's nft table (dataplane.py) holds a nat prerouting chain that DNATs
NEW connections arriving at the pod's addresses on a stolen port to the client's
tunnel address and its local port; conntrack does the rest, so no Python is on
the packet path. The port maps are nft maps with `flags timeout`: every element
lives TIMEOUT seconds unless the agent writes it again, which it does every
REFRESH seconds. That is the dead-man switch: if every agent process is killed,
nothing refreshes them and the pod gets its traffic back by itself. The guard
(guard.py) removes the whole table at once when only the worker dies, and a
new agent removes leftovers at start.

Only the connections this DNAT made may enter the TUN: the forward chain accepts
`ct status dnat` toward the client's address on the stolen *local* ports, and
drops every other new connection into the TUN as before (SECURITY.md).

Filtered (HTTP) steals: the same chain REDIRECTs new connections on a filtered
port to the agent's listener for that port (map `filter_tcp`, same timeouts),
which routes each request (proxy.py). The table's output chain lets the
agent's own marked sockets open connections into the TUN to the filtered local
ports (set `filter_local`), and nothing else.

IPv6: a session that carries IPv6 has a twin table in the `ip6` family
(dataplane.py) with the same maps, sets and chains for the pod's IPv6 addresses,
DNATing to the client's IPv6 tunnel address; `apply` writes both tables in one
transaction, so both families are stolen, refreshed and given back together.
Excluded sources go to the table of their family.

Sessions do not trust each other: `Registry` refuses a whole-port steal of a port
another session steals. Filtered steals are claimed there too (several per port,
never with a whole-port one).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Callable, NamedTuple

from mirrord_tun import protocol
from mirrord_tun.agent.steal import neighbours, proxy
from mirrord_tun.agent.steal.filters import HttpFilter
from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import StealRequest, StealState
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns.agent")
REFRESH = 3.0  # seconds between rewrites of the port maps
TIMEOUT = 10  # seconds a map element lives without one: REFRESH plus room for a busy loop
PROTOCOLS = ("tcp", "udp")
_EXCLUDE = "steal_exclude"
_ADDR_TYPE = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}
_VERSION = {"ip": 4, "ip6": 6}


def declarations(tunnels: str, client: str, pod_addrs: list[str], family: str = "ip") -> str:
    """The session table's steal maps, sets and nat chain (empty maps: nothing stolen);
    `tunnels`: an nft name pattern matching every session's TUN; `family`: the table's,
    "ip" or "ip6" (whose addresses `client` and `pod_addrs` are)."""
    out = "".join(f"  map steal_{p} {{ type inet_service : inet_service; flags timeout; }}\n"
                  f"  set local_{p} {{ type inet_service; }}\n" for p in PROTOCOLS)
    out += (f"  set {_EXCLUDE} {{ type {_ADDR_TYPE[family]}; flags interval; auto-merge; }}\n"
            "  map filter_tcp { type inet_service : inet_service; flags timeout; }\n"
            "  set filter_local { type inet_service; }\n")
    pods = ", ".join(pod_addrs)
    to = client if family == "ip" else f"[{client}]"  # nft's IPv6 address before a port
    dnat = "".join(f"    {family} daddr {{ {pods} }} meta l4proto {p} dnat to {to} : {p} dport map @steal_{p}\n"
                   for p in PROTOCOLS) if pod_addrs else ""
    if pod_addrs:
        # Past a cap, a new connection to a filtered port is not redirected: the pod's server
        # gets it straight from the kernel, as without a session (proxy.connection_caps).
        per_source, total = proxy.connection_caps()
        dnat += (f"    {family} daddr {{ {pods} }} tcp dport @filter_tcp "
                 f"meter proxy_per_source {{ {family} saddr ct count over {per_source} }} return\n"
                 f"    {family} daddr {{ {pods} }} tcp dport @filter_tcp ct count over {total} return\n"
                 f"    {family} daddr {{ {pods} }} meta l4proto tcp redirect to : tcp dport map @filter_tcp\n")
    return out + (
        "  chain steal {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        # Never from a tunnel: one session's traffic to the pod is not another's to take.
        f'    iifname "{tunnels}" return\n'
        f"    {family} saddr @{_EXCLUDE} return\n"
        f"{dnat}"
        "  }\n"
    )


def forward_rules(tun: str, client: str, family: str = "ip") -> str:
    """Forward-chain rules letting in exactly the connections the steal chain DNATed."""
    return "".join(f'    oifname "{tun}" {family} daddr {client} ct status dnat {p} dport @local_{p} accept\n'
                   for p in PROTOCOLS)


def output_rules(tun: str, client: str, family: str = "ip") -> str:
    """Output-chain rules letting the agent's proxy (its marked sockets) into the TUN, to the
    filtered local ports only; before the chain drops every other new connection into it."""
    return (f'    oifname "{tun}" meta mark {proxy.LOCAL_MARK} {family} daddr {client} tcp dport @filter_local '
            "ct state new accept\n")


class Plan(NamedTuple):
    """What one session's table steals: pod port -> local port (tcp, udp), pod port -> proxy
    listener port (redirect), the filtered local ports, and the excluded sources."""

    tcp: dict[int, int]
    udp: dict[int, int]
    redirect: dict[int, int]
    filter_local: frozenset[int]
    exclude: tuple[str, ...]

    def empty(self) -> bool:
        return not (self.tcp or self.udp or self.redirect)


NOTHING = Plan({}, {}, {}, frozenset(), ())


def apply(table: str, plan: Plan, families: tuple[str, ...] = ("ip",)) -> None:
    """Replace what `table` steals in each of its `families` ("ip", and "ip6" when the session
    carries IPv6), in one transaction; also the refresh of the dead-man switch."""
    lines: list[str] = []
    for family in families:
        lines += _apply(f"{family} {table}", plan,
                        [c for c in plan.exclude if ipaddress.ip_network(c).version == _VERSION[family]])
    nft.run("\n".join(lines) + "\n")


def _apply(table: str, plan: Plan, exclude: list[str]) -> list[str]:
    lines = [f"flush set {table} {_EXCLUDE}", f"flush map {table} filter_tcp", f"flush set {table} filter_local"]
    if exclude:
        lines.append(f"add element {table} {_EXCLUDE} {{ {', '.join(exclude)} }}")
    if plan.redirect:
        elements = ", ".join(f"{p} timeout {TIMEOUT}s : {l}" for p, l in sorted(plan.redirect.items()))
        lines += [f"add element {table} filter_tcp {{ {elements} }}",
                  f"add element {table} filter_local {{ {', '.join(map(str, sorted(plan.filter_local)))} }}"]
    for proto, ports in (("tcp", plan.tcp), ("udp", plan.udp)):
        lines += [f"flush map {table} steal_{proto}", f"flush set {table} local_{proto}"]
        if ports:
            elements = ", ".join(f"{p} timeout {TIMEOUT}s : {l}" for p, l in sorted(ports.items()))
            lines += [f"add element {table} steal_{proto} {{ {elements} }}",
                      f"add element {table} local_{proto} {{ {', '.join(map(str, sorted(set(ports.values()))))} }}"]
    return lines


def reset_stolen(stolen_by: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]) -> int:
    """Forget the conntrack entries of connections DNATed to a tunnel client `stolen_by` names
    (IPv4 and IPv6 ones).

    The client's next packet then meets the pod's own kernel as a stray segment,
    which it answers with a RST: a stolen connection ends at once instead of
    hanging on a tunnel that is gone. Returns how many were forgotten.
    """
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import IPS_DST_NAT, NFCTAttrTuple

    n = 0
    for family, src_attr in ((socket.AF_INET, "CTA_IP_V4_SRC"), (socket.AF_INET6, "CTA_IP_V6_SRC")):
        with NFCTSocket(nfgen_family=family) as ct:  # a dump of this family's entries only
            doomed = []
            for msg in ct.dump(status=IPS_DST_NAT, status_mask=IPS_DST_NAT):
                reply = msg.get_attr("CTA_TUPLE_REPLY")
                src = reply.get_attr("CTA_TUPLE_IP").get_attr(src_attr) if reply else None
                if src and stolen_by(ipaddress.ip_address(src)):
                    doomed.append(NFCTAttrTuple.from_netlink(family, msg.get_attr("CTA_TUPLE_ORIG")))
            for orig in doomed:
                try:
                    ct.entry("del", tuple_orig=orig)
                    n += 1
                except Exception as e:  # noqa: BLE001 - gone meanwhile (closed, timed out): nothing to do
                    log.debug("conntrack entry %s: %s", orig, e)
    return n


class Registry:
    """Who steals what among this agent's sessions; a holder is a session's printable label."""

    def __init__(self) -> None:
        self._whole: dict[str, str] = {}  # "tcp/80" -> holder
        self._filtered: dict[int, set[str]] = {}  # TCP port -> holders

    def claim(self, holder: str, whole: set[str], filtered: set[int]) -> dict[str, str]:
        """Replace `holder`'s claims with these; returns the refused ones with the reason."""
        self.release(holder)
        refused: dict[str, str] = {}
        for name in sorted(whole):
            proto, _, port = name.partition("/")
            other = self._whole.get(name)
            sharing = self._filtered.get(int(port), set()) if proto == "tcp" else set()
            if other:
                refused[name] = f"{proto} port {port} is already stolen by session {other}"
            elif sharing:
                refused[name] = f"tcp port {port} has filtered steals by session {min(sharing)}"
            else:
                self._whole[name] = holder
        for port in sorted(filtered):
            other = self._whole.get(f"tcp/{port}")
            if other:
                refused[f"tcp/{port}"] = f"tcp port {port} is already stolen by session {other}"
            else:
                self._filtered.setdefault(port, set()).add(holder)
        return refused

    def release(self, holder: str) -> None:
        for name in [n for n, h in self._whole.items() if h == holder]:
            del self._whole[name]
        for port in list(self._filtered):
            self._filtered[port].discard(holder)
            if not self._filtered[port]:
                del self._filtered[port]


REGISTRY = Registry()  # one agent process serves one target namespace: its sessions share it
_proxies: dict[int, proxy.Proxies] = {}  # by the NetNs's id: likewise one per agent process


def proxies_for(ns: NetNs) -> proxy.Proxies:
    if id(ns) not in _proxies:
        _proxies[id(ns)] = proxy.Proxies(ns)
    return _proxies[id(ns)]


class SessionSteal:
    """One session's steal: applies each STEAL, keeps the dead-man switch fed, releases at the end."""

    def __init__(self, ns: NetNs, table: str, pod_addrs: list[str], client: str, holder: str, counters: Counters,
                 registry: Registry = REGISTRY, pod_addrs6: list[str] | None = None, client6: str = "") -> None:
        """`pod_addrs6`, `client6`: the session's IPv6 ones when it carries IPv6 (its ip6 table)."""
        self._ns, self._table, self.holder = ns, table, holder
        self._pod_addrs = [*pod_addrs, *(pod_addrs6 or [])]
        # The client's tunnel address by family, for the proxy's connections to the program.
        self._clients = {socket.AF_INET: client, **({socket.AF_INET6: client6} if client6 else {})}
        self._families = ("ip", "ip6") if client6 else ("ip",)
        self._counters = counters
        self._registry = registry
        self._proxies = proxies_for(ns)
        self._lock = asyncio.Lock()  # STEALs apply in order, never under a refresh
        self._now = NOTHING
        self._refresher: asyncio.Task[None] | None = None
        self.used = False  # whether anything was ever stolen (then conntrack is reset at the end)
        self._closed = False

    async def request(self, req: StealRequest) -> StealState:
        async with self._lock:
            filtered = {f.port: f for f in req.filtered}
            whole = {f"{p}/{port}" for p, ports in (("tcp", req.tcp), ("udp", req.udp)) for port in ports}
            names = whole | {f"tcp/{p}" for p in filtered}
            if self._closed or not self._pod_addrs:  # ending; or nothing to DNAT from (declarations())
                why = "the session is closing" if self._closed else "the pod has no address the session carries"
                return StealState((), {name: why for name in names})
            refused = await self._claim(whole, set(filtered), names)
            tcp = {p: l for p, l in req.tcp.items() if f"tcp/{p}" not in refused}
            udp = {p: l for p, l in req.udp.items() if f"udp/{p}" not in refused}
            wanted = {}
            for port, f in filtered.items():
                if f"tcp/{port}" in refused:
                    continue
                try:  # the wire format checked the regexes, but not with the flags used here
                    wanted[port] = (HttpFilter.compile(f.header, f.path, f.method, f.all_of, f.any_of), f.local)
                except ValueError as e:
                    refused[f"tcp/{port}"] = str(e)[:protocol.MAX_REASON]
            try:
                redirect = await self._proxies.join(self.holder, self._clients, wanted)
                plan = Plan(tcp, udp, redirect, frozenset(l for _f, l in wanted.values()), req.exclude)
                await self._ns.acall(apply, self._table, plan, self._families)
            except (nft.NftError, OSError) as e:  # the container deleted our table; nft is missing
                why = " ".join(str(e).split())[:protocol.MAX_REASON]
                log.warning("session %s: steal failed: %s", self.holder, why)
                self._registry.release(self.holder)
                refused.update({name: f"the agent could not steal it: {why}" for name in names})
                plan = NOTHING
            # Only once the redirects are gone: a listener no table leads to any more.
            await self._proxies.leave(self.holder, keep=frozenset(plan.redirect))
            self._now = plan
            self.used = self.used or bool(plan.tcp or plan.udp)
            if not plan.empty() and self._refresher is None:
                self._refresher = asyncio.create_task(self._refresh())
            stolen = sorted(f"tcp/{p}" for p in {**plan.tcp, **plan.redirect}) + sorted(f"udp/{p}" for p in plan.udp)
            log.info("session %s: stealing %s%s", self.holder, " ".join(stolen) or "nothing",
                     f", refused {refused}" if refused else "")
            return StealState(tuple(stolen), refused)

    async def _claim(self, whole: set[str], filtered: set[int], names: set[str]) -> dict[str, str]:
        """The Registry's claim, after the ports other agents' sessions steal here are refused."""
        try:
            elsewhere = await self._ns.acall(neighbours.stolen_elsewhere)
        except (nft.NftError, OSError) as e:  # apply() says what is wrong with nft, if anything
            log.debug("session %s: other agents' steals unknown: %s", self.holder, e)
            elsewhere = {}
        busy = {name: f"{name.replace('/', ' port ')} is already stolen by session {elsewhere[name]} of another "
                      "agent (another run on this pod; filtered steals share a port only within one agent)"
                for name in names if name in elsewhere}
        refused = self._registry.claim(self.holder, whole - set(busy),
                                       {p for p in filtered if f"tcp/{p}" not in busy})
        return {**refused, **busy}

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            async with self._lock:
                if self._now.empty():
                    continue
                try:
                    await self._ns.acall(apply, self._table, self._now, self._families)
                except (nft.NftError, OSError) as e:  # the container deleted our table: the steal is gone anyway
                    self._counters["steal_refresh_failed"] += 1
                    log.debug("session %s: steal refresh failed: %s", self.holder, e)

    async def close(self) -> None:
        """Stop refreshing and give the ports up; the table itself goes with the session."""
        async with self._lock:
            self._closed = True
            if self._now.redirect:  # no redirect may outlive the listener it leads to
                with contextlib.suppress(nft.NftError, OSError):
                    await self._ns.acall(apply, self._table, NOTHING, self._families)
            self._now = NOTHING
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        self._registry.release(self.holder)
        await self._proxies.leave(self.holder)
