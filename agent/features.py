"""The agent's session features: the tunnel (TUN and pump), the mirror's capture, steal.

Each plugs into an AgentSession (session.py) through feature.py's `Feature`: it owns its frame
kinds from the client and hears of flow control, detach, resume and the end. The session
starts the mirror and steal features only for clients whose protocol version has them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import SessionPlane
from mirrord_tun.agent.sniffer import Sniffer
from mirrord_tun.agent.steal.rules import SessionSteal
from mirrord_tun.channel import Sender
from mirrord_tun.feature import Feature, Handler
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump, source_is
from mirrord_tun.sshfast import OutFrame

log = logging.getLogger("mirrord-ns.agent")
Send = Callable[[bytes | OutFrame], None]


class AgentTunnel(Feature):
    """The session's TUN in the target's namespace (an open SessionPlane) and its pump; `stop`
    closes the plane, which resets conntrack if `stole()` says anything was ever stolen."""

    def __init__(self, ns: NetNs, plane: SessionPlane, out: Sender, counters: Counters,
                 stole: Callable[[], bool]) -> None:
        assert plane.tun is not None
        self._ns, self.plane, self._stole = ns, plane, stole
        # admit_out None: the pod's packets go to the client unchecked; `run` checks their destination.
        self.pump = TunPump(plane.tun.fd, out, AgentMsg.PACKETS, admit_out=None,
                            admit_in=source_is(*plane.client_addrs), counters=counters)

    def frames(self) -> dict[int, Handler]:
        return {ClientMsg.PACKETS: self.pump.deliver}

    async def start(self) -> None:
        self.pump.start()

    def packet_pump(self) -> TunPump:
        return self.pump

    async def stop(self) -> None:
        self.pump.stop()
        await self._ns.acall(self.plane.close, self._stole())

    def pause_writing(self) -> None:
        self.pump.pause()

    def resume_writing(self) -> None:
        self.pump.resume()

    # Detached: reading pauses, the kernel's queues fill and drop; nothing is held here.
    on_detach = pause_writing
    on_resume = resume_writing


class Capture(Feature):
    """The mirror's side here: SUBSCRIBE names the pod ports whose traffic is copied to the client."""

    def __init__(self, ns: NetNs, plane: SessionPlane, send: Send, counters: Counters, sid: str) -> None:
        self._ns, self._plane, self._send, self._counters, self._sid = ns, plane, send, counters, sid
        self.sniffer: Sniffer | None = None  # made by the first SUBSCRIBE; its sockets open with a port

    def frames(self) -> dict[int, Handler]:
        return {ClientMsg.SUBSCRIBE: self._subscribe}

    def _subscribe(self, body: bytes) -> None:
        try:
            ports = protocol.parse_subscribe(body)
        except protocol.Malformed:
            self._counters["dropped_frames_malformed"] += 1
            return
        if self.sniffer is None:
            self.sniffer = Sniffer(self._ns, self._plane.pod_addrs + self._plane.pod_addrs6, self._send,
                                   self._counters)
        self.sniffer.subscribe(ports)
        log.info("session %s: mirroring ports %s", self._sid, ",".join(map(str, sorted(ports))) or "none")

    async def stop(self) -> None:
        if self.sniffer:
            await self.sniffer.aclose()

    def pause_writing(self) -> None:
        if self.sniffer:
            self.sniffer.pause()

    def resume_writing(self) -> None:
        if self.sniffer:
            self.sniffer.resume()

    on_detach = pause_writing
    on_resume = resume_writing

    def on_stats(self) -> None:
        if self.sniffer:
            self._counters.update(self.sniffer.kernel_stats())


class Stealing(Feature):
    """Steal here: STEAL asks for pod ports, answered with STEAL_STATE; while the session is
    detached the pod's new connections go back to the pod until the client asks again."""

    def __init__(self, ns: NetNs, plane: SessionPlane, send: Send, counters: Counters, holder: str,
                 ended: Callable[[], bool]) -> None:
        self._ns, self._plane, self._send, self._counters = ns, plane, send, counters
        self._holder, self._ended = holder, ended  # ended(): the session is over (answer no more)
        self.steal: SessionSteal | None = None  # made by the first STEAL
        self._withdrawing: asyncio.Task[protocol.StealState] | None = None
        self._answering: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    @property
    def used(self) -> bool:
        return self.steal is not None and self.steal.used

    def frames(self) -> dict[int, Handler]:
        return {ClientMsg.STEAL: self._on_steal}

    def _on_steal(self, body: bytes) -> None:
        try:
            request = protocol.parse_steal(body)
        except protocol.Malformed as e:
            self._counters["dropped_frames_malformed"] += 1
            log.debug("session %s: bad STEAL: %s", self._holder, e)
            return
        if self.steal is None:
            p = self._plane
            self.steal = SessionSteal(self._ns, p.table, p.pod_addrs, p.client_addr, self._holder, self._counters,
                                      pod_addrs6=p.pod_addrs6, client6=p.client_addr6)
        task = asyncio.create_task(self._answer(self.steal, request))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, steal: SessionSteal, request: protocol.StealRequest) -> None:
        state = await steal.request(request)
        if not self._ended():
            self._send(protocol.control(AgentMsg.STEAL_STATE, state.to_json()))

    def on_detach(self) -> None:
        if self.steal:
            self._withdrawing = asyncio.create_task(self.steal.request(protocol.StealRequest()))

    async def stop(self) -> None:
        if self.steal:
            await self.steal.close()
