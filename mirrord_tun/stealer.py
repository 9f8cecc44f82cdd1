"""run's side of steal: which ports to ask for, asking the agent, and the inbound guard.

`StealOptions` is what `--steal`, `--port` and the HTTP filters ask for; `Stealer` is the session
feature that follows the ports the program serves, sends STEAL, takes the agent's STEAL_STATE
and lets exactly the stolen ports into the namespace (netns/routes.py's inbound guard).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.connect import SetupError, printable
from mirrord_tun.feature import Feature, Handler
from mirrord_tun.mirror.ports import POLL_INTERVAL, steal_ports
from mirrord_tun.netns import routes, sockdiag
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.options import HttpFilterSpec
from mirrord_tun.protocol import AgentMsg
from mirrord_tun.pump import Counters
from mirrord_tun.tunnel import TUN_NAME

log = logging.getLogger("mirrord-ns")
STEAL_ANSWER_TIMEOUT = 15  # for the agent's STEAL_STATE (a liveness bound)
UNSTEAL_WAIT = 0.5  # at the end, for the agent to confirm it gave the ports back

DEFAULT_HTTP_PORTS = (80, 8080)  # mirrord's http_filter.ports default


@dataclasses.dataclass(frozen=True)
class StealOptions:
    """`--steal`: the pod's connections to the program's ports go to the program instead."""

    ports: dict[int, int]  # --port: pod port -> local port, stolen (over TCP) whether served or not
    exclude: tuple[str, ...] = ()  # source CIDRs that keep reaching the pod (checked with protocol.cidr)
    # With a filter, the HTTP ports' requests are stolen one by one, only those that match; the
    # other TCP ports are stolen whole if named with --port, else left to the pod; UDP whole.
    http: HttpFilterSpec = HttpFilterSpec()

    def check_agent(self, version: int) -> None:
        """SetupError if an agent speaking protocol `version` cannot steal as asked."""
        if version < protocol.STEAL_VERSION:
            raise SetupError(f"the agent speaks protocol {version}, too old to steal "
                             f"(needs {protocol.STEAL_VERSION})")
        h = self.http
        if version < protocol.FILTER_VERSION and (h.method is not None or h.all_of or h.any_of):
            raise SetupError(f"the agent speaks protocol {version}, too old for method, all-of "
                             f"and any-of filters (needs {protocol.FILTER_VERSION})")

    def http_ports(self) -> set[int]:
        return set(self.http.ports) if self.http.ports else {*DEFAULT_HTTP_PORTS, *self.ports}

    def request(self, tcp: dict[int, int], udp: dict[int, int]) -> protocol.StealRequest:
        if not self.http.given():
            return protocol.StealRequest(tcp, udp, self.exclude)
        http = self.http_ports()
        filtered_ports = sorted(p for p in tcp if p in http)
        if len(filtered_ports) > protocol.MAX_FILTERED:
            log.warning("filtering the lowest %d of %d ports", protocol.MAX_FILTERED, len(filtered_ports))
        h = self.http
        filtered = tuple(protocol.FilteredSteal(p, tcp[p], h.header, h.path, h.method, h.all_of, h.any_of)
                         for p in filtered_ports[:protocol.MAX_FILTERED])
        whole = {p: l for p, l in tcp.items() if p not in http and p in self.ports}
        return protocol.StealRequest(whole, udp, self.exclude, filtered)


class Stealer(Feature):
    """run's side of steal: asks the agent for the ports the program serves (and --port), and
    lets exactly those into the namespace through the inbound guard."""

    def __init__(self, ns: NetNs, client_addrs: list[str], options: StealOptions,
                 send: Callable[[bytes], None], counters: Counters, connected: Callable[[], bool]) -> None:
        """`client_addrs`: the tunnel's addresses, IPv4 and (when the session carries it) IPv6;
        `connected()`: whether the link is up now (to give the ports back at the end)."""
        if not any(":" in a for a in client_addrs):
            # IPv6 sources mean nothing to an IPv4-only session, and an agent older than IPv6 takes
            # a STEAL naming one for malformed (and never answers it).
            options = dataclasses.replace(options, exclude=tuple(c for c in options.exclude if ":" not in c))
        self._ns, self._clients, self._opts, self._send = ns, client_addrs, options, send
        self._counters, self._connected = counters, connected
        self._wanted: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._answer: asyncio.Future[protocol.StealState] | None = None
        self._warned: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stale = False  # the agent withdrew the steal while we were away: ask again
        self._probe: sockdiag.Probe | None = None

    async def start(self) -> None:
        """Steal before the command starts; a --port the agent refuses is a SetupError."""
        state = await self._ask(*await self._serving())
        explicit = {f"tcp/{p}" for p in self._opts.ports}
        refused = [f"{name}: {printable(why)}" for name, why in sorted(state.refused.items()) if name in explicit]
        if refused:
            raise SetupError(f"cannot steal {'; '.join(refused)}")
        self._warn(state)
        self._task = asyncio.create_task(self._follow())

    def frames(self) -> dict[int, Handler]:
        return {AgentMsg.STEAL_STATE: self._on_state}

    def _on_state(self, body: bytes) -> None:
        """The agent's STEAL_STATE; counted as unexpected if none was asked for."""
        state = protocol.StealState.from_json(protocol.parse_control(body))
        if self._answer is None or self._answer.done():
            self._counters["dropped_frames_unexpected"] += 1
        else:
            self._answer.set_result(state)

    def on_resume(self) -> None:
        """The agent gives a detached session's ports back to the pod: ask for them again now."""
        if self._answer is not None and not self._answer.done():
            self._send(protocol.steal(self._opts.request(*self._wanted)))  # its answer ends the pending ask
        else:
            self._stale = True  # asked at the next poll, at most POLL_INTERVAL away

    async def stop(self) -> None:
        """Give the ports back before the session closes (the agent's teardown would, a little later)."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connected() and any(self._wanted):
            with contextlib.suppress(asyncio.TimeoutError, SetupError):
                await asyncio.wait_for(self._ask({}, {}), UNSTEAL_WAIT)
        if self._probe is not None:
            self._probe.close()

    async def _serving(self) -> tuple[dict[int, int], dict[int, int]]:
        if self._probe is None:
            self._probe = await sockdiag.Probe.open(self._ns)
        tcp, udp = self._probe.serving_ports(self._clients)
        return steal_ports(tcp, udp, self._opts.ports)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            wanted = await self._serving()
            if wanted != self._wanted or self._stale:
                self._stale = False
                try:
                    self._warn(await self._ask(*wanted))
                except SetupError as e:  # e.g. lost with the connection: asked again at the next poll
                    log.warning("%s", e)
                    self._stale = True

    async def _ask(self, tcp: dict[int, int], udp: dict[int, int]) -> protocol.StealState:
        # The guard lets in the old and the new ports while the agent switches, then the new only.
        old_tcp, old_udp = self._wanted
        await self._guard({*old_tcp.values(), *tcp.values()}, {*old_udp.values(), *udp.values()})
        self._wanted = (tcp, udp)
        self._answer = asyncio.get_running_loop().create_future()
        self._send(protocol.steal(self._opts.request(tcp, udp)))
        try:
            state = await asyncio.wait_for(self._answer, STEAL_ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            raise SetupError(f"the agent did not answer STEAL within {STEAL_ANSWER_TIMEOUT} s") from None
        # Then only what the agent says it steals: a refused port stays shut, whatever the agent sends.
        await self._guard({l for p, l in tcp.items() if f"tcp/{p}" in state.stolen},
                          {l for p, l in udp.items() if f"udp/{p}" in state.stolen})
        log.info("stealing %s", " ".join(state.stolen) or "nothing")
        return state

    async def _guard(self, tcp: set[int], udp: set[int]) -> None:
        await self._ns.acall(routes.refuse_inbound, TUN_NAME, self._clients, tcp, udp)

    def _warn(self, state: protocol.StealState) -> None:
        for name, why in sorted(state.refused.items()):
            if name not in self._warned:
                self._warned.add(name)
                print(f"mirrord-ns: not stealing {name}: {printable(why)}", file=sys.stderr, flush=True)
