"""One client session inside the agent: HELLO, data plane, packets, teardown.

A v4 session outlives its SSH connection for the agent's grace period (`resume_timeout`):
its TUN, addresses, nft state, steal and capture stay, reading them pauses (the kernel's
queues fill and drop: nothing is held without bound here), and a new connection
authenticated with the same client key may take it over with RESUME and the session's
secret. When the grace period ends the session is torn down as if the client had left.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import SessionPlane
from mirrord_tun.agent.sniffer import Sniffer
from mirrord_tun.agent.steal.rules import SessionSteal
from mirrord_tun.agent.target import read_resolv_conf
from mirrord_tun.channel import FrameSession
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump, source_is

if TYPE_CHECKING:
    from mirrord_tun.agent.server import Agent

log = logging.getLogger("mirrord-ns.agent")


class AgentSession:
    def __init__(self, agent: "Agent", chan: FrameSession, peer: str, key_fingerprint: str) -> None:
        self.agent = agent
        self.chan = chan
        self.peer = peer
        self.key_fingerprint = key_fingerprint  # the client key the session is bound to
        self.sid = secrets.token_hex(4)
        self.secret = secrets.token_hex(32)
        self.welcome: protocol.Welcome | None = None
        self._grace: asyncio.TimerHandle | None = None  # set while detached
        self.counters: Counters = Counters()
        self.plane: SessionPlane | None = None
        self.pump: TunPump | None = None
        self.sniffer: Sniffer | None = None  # opened by the first SUBSCRIBE
        self.steal: SessionSteal | None = None  # made by the first STEAL
        self._withdrawing: asyncio.Task[protocol.StealState] | None = None  # the steal, while detached
        self.version = 0
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self._resumable = True  # False once the agent stops or this channel tried RESUME
        agent.sessions.add(self)

    def close(self) -> None:
        """End the session now, connected or detached (the agent is stopping)."""
        self._resumable = False
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
            self._end()
        elif self.chan.chan:
            self.chan.chan.close()
        else:
            self.on_closed(None)

    def write(self, data: bytes) -> None:
        """To the current connection; while there is none (detached, or closing), dropped and counted."""
        if self._grace is not None or not self.chan.write(data):
            self.counters["dropped_frames_closed"] += 1

    # Endpoint
    def on_frame(self, kind: int, body: bytes) -> None:
        if kind == ClientMsg.PACKETS and self.pump:
            self.pump.deliver(body)
        elif kind == ClientMsg.HELLO and self._starting is None:
            self._starting = asyncio.create_task(self._start(body))
        elif kind == ClientMsg.RESUME and self._starting is None and self.plane is None:
            self._resume(body)
        elif kind == ClientMsg.SUBSCRIBE and self.plane and self.version >= protocol.MIRROR_VERSION:
            self._subscribe(body)
        elif kind == ClientMsg.STEAL and self.plane and self.version >= protocol.STEAL_VERSION:
            self._steal(body)
        elif kind == ClientMsg.STATS:
            if self.sniffer:
                self.counters.update(self.sniffer.kernel_stats())
            stats = dict(self.counters)
            stats["dropped_frames_oversized"] = self.chan.reader.oversized
            self.write(protocol.control(AgentMsg.STATS, stats))
        else:
            self.counters["dropped_frames_unexpected"] += 1
            log.debug("session %s: unexpected %s frame, %d bytes", self.sid, protocol.kind_name(kind), len(body))

    def on_pause(self) -> None:
        if self.pump:
            self.pump.pause()
        if self.sniffer:
            self.sniffer.pause()

    def on_resume(self) -> None:
        if self.pump:
            self.pump.resume()
        if self.sniffer:
            self.sniffer.resume()

    def on_closed(self, exc: Exception | None) -> None:
        if self._closed or self._grace is not None:
            return
        grace = self.agent.resume_timeout
        # exc is None when the client closed the channel or said goodbye (SSH disconnect): it is done.
        if (exc is not None and self._resumable and self.plane is not None
                and self.version >= protocol.RESUME_VERSION and grace > 0):
            self.on_pause()
            if self.steal:  # the pod's new connections go back to the pod until the client asks again
                self._withdrawing = asyncio.create_task(self.steal.request(protocol.StealRequest()))
            self._grace = asyncio.get_running_loop().call_later(grace, self._expire)
            log.info("session %s: connection lost (%s); kept for %g s", self.sid, exc, grace)
            return
        self._end()

    def _end(self) -> None:
        self._closed = True
        if self.pump:
            self.pump.stop()
        asyncio.create_task(self._teardown())

    def _expire(self) -> None:
        self._grace = None
        log.info("session %s: not resumed within %g s", self.sid, self.agent.resume_timeout)
        self._end()

    def _resume(self, body: bytes) -> None:
        """This fresh channel asks to take over a session (detached, or whose old connection we have
        not seen die yet): same client key, right secret, within the grace period."""
        self._resumable = False  # whatever happens, this stand-in never becomes a session
        self.agent.sessions.discard(self)
        try:
            sid, secret = protocol.parse_resume(body)
        except protocol.Malformed as e:
            return self._refuse_resume(f"bad RESUME: {e}", "?")
        target = next((s for s in self.agent.sessions if s.sid == sid), None)
        # One answer for all of these: no hint which part was wrong.
        if (target is None or target is self or target.welcome is None or target._closed
                or target.version < protocol.RESUME_VERSION
                or not hmac.compare_digest(target.key_fingerprint.encode(), self.key_fingerprint.encode())
                or not hmac.compare_digest(target.secret.encode(), secret.encode())):
            return self._refuse_resume("no such session to resume (unknown, expired, or not yours)", sid)
        target.reattach(self.chan, self.peer)

    def _refuse_resume(self, reason: str, sid: str) -> None:
        self.agent.resume_refused += 1
        log.warning("refused RESUME of session %s from %s (key %s): %s [%d refused so far]", sid, self.peer,
                    self.key_fingerprint, reason, self.agent.resume_refused)
        self.chan.write(protocol.control(AgentMsg.ERROR, {"error": reason}))
        self._closed = True
        if self.chan.chan:
            self.chan.chan.close()

    def reattach(self, chan: FrameSession, peer: str) -> None:
        """Carry on over `chan`. A client may come back before we saw its old connection die
        (a silent network): that one is closed now and no longer speaks for the session."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        elif self.chan is not chan:
            old = self.chan
            old.endpoint = None
            if old.chan:
                old.chan.close()
        chan.endpoint = self
        self.chan, self.peer = chan, peer
        self.counters["resumed"] += 1
        log.info("session %s resumed from %s", self.sid, peer)
        if self.welcome:
            self.write(protocol.control(AgentMsg.WELCOME, self.welcome.to_json()))
        self.on_resume()

    async def _start(self, body: bytes) -> None:
        try:
            hello = protocol.parse_control(body)
            version = min(int(hello.get("version", 0)), protocol.VERSION)
            if version < protocol.MIN_VERSION:
                raise ValueError(f"client protocol {hello.get('version')} is older than {protocol.MIN_VERSION}")
            # In bounded threads with a time limit: the file is the container's, and its file system may hang.
            try:
                resolv_conf = await self.agent.resolver_workers.call(read_resolv_conf, self.agent.target,
                                                                     self.agent.files.serve_fs)
            except OSError as e:  # busy or too slow: the session starts without it
                log.warning("not reporting a resolver: %s", e.strerror)
                resolv_conf = ""
            plane = SessionPlane(self.sid, self.agent.ipv6_forwarding)
            await self.agent.ns.acall(plane.open)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the client
            log.warning("session %s from %s refused: %s", self.sid, self.peer, e)
            self.chan.write(protocol.control(AgentMsg.ERROR, {"error": str(e)}))
            if self.chan.chan:
                self.chan.chan.close()
            return
        self.plane = plane
        self.version = version
        if self._closed:  # the client left while we were setting up
            await self._teardown()
            return
        assert plane.tun is not None
        self.pump = TunPump(plane.tun.fd, self.write, AgentMsg.PACKETS,
                            admit_out=lambda _p: None, admit_in=source_is(*plane.client_addrs),
                            counters=self.counters)
        welcome = protocol.Welcome(version, self.sid, plane.client_addr, plane.agent_addr, plane.mtu,
                                   plane.pod_addrs, resolv_conf, client_addr6=plane.client_addr6,
                                   agent_addr6=plane.agent_addr6, pod_addrs6=plane.pod_addrs6,
                                   ipv6_off=plane.ipv6_off)
        if version >= protocol.RESUME_VERSION:
            welcome.secret, welcome.resume_timeout = self.secret, self.agent.resume_timeout
        self.welcome = welcome
        self.write(protocol.control(AgentMsg.WELCOME, welcome.to_json()))
        self.pump.start()
        log.info("session %s from %s: tunnel %s via %s, pod %s", self.sid, self.peer,
                 ",".join(plane.client_addrs), plane.tun.name if plane.tun else "?",
                 ",".join(plane.pod_addrs + plane.pod_addrs6))

    def _subscribe(self, body: bytes) -> None:
        assert self.plane is not None
        try:
            ports = protocol.parse_subscribe(body)
        except protocol.Malformed:
            self.counters["dropped_frames_malformed"] += 1
            return
        if self.sniffer is None:
            self.sniffer = Sniffer(self.agent.ns, self.plane.pod_addrs + self.plane.pod_addrs6, self.write,
                                   self.counters)
        self.sniffer.subscribe(ports)
        log.info("session %s: mirroring ports %s", self.sid, ",".join(map(str, sorted(ports))) or "none")

    def _steal(self, body: bytes) -> None:
        assert self.plane is not None
        try:
            request = protocol.parse_steal(body)
        except protocol.Malformed as e:
            self.counters["dropped_frames_malformed"] += 1
            log.debug("session %s: bad STEAL: %s", self.sid, e)
            return
        if self.steal is None:
            self.steal = SessionSteal(self.agent.ns, self.plane.table, self.plane.pod_addrs, self.plane.client_addr,
                                      f"{self.sid} (from {self.peer})", self.counters,
                                      pod_addrs6=self.plane.pod_addrs6, client6=self.plane.client_addr6)
        asyncio.create_task(self._answer_steal(self.steal, request))

    async def _answer_steal(self, steal: SessionSteal, request: protocol.StealRequest) -> None:
        state = await steal.request(request)
        if not self._closed:
            self.write(protocol.control(AgentMsg.STEAL_STATE, state.to_json()))

    async def _teardown(self) -> None:
        if self.sniffer:
            await self.sniffer.aclose()
        stole = False
        if self.steal:
            await self.steal.close()
            stole = self.steal.used
        plane, self.plane = self.plane, None
        if plane is None:
            self.agent.sessions.discard(self)
            return
        await self.agent.ns.acall(plane.close, stole)
        c = self.counters
        log.info("session %s closed: %d packets / %d bytes in, %d packets / %d bytes out, "
                 "dropped: %s", self.sid, c["packets_in"], c["bytes_in"], c["packets_out"],
                 c["bytes_out"], {k: v for k, v in c.items() if k.startswith("dropped_")} or "none")
        self.agent.sessions.discard(self)
