"""One client session inside the agent, told in five steps.

1. A channel's first frame is HELLO (a new session) or RESUME (take over a detached one, below).
2. HELLO: the session's plane is opened in the target's namespace (agent/dataplane.py: TUN,
   addresses, nft table) and WELCOME says so to the client.
3. The features (features.py) plug in: the tunnel's pump always, the mirror's capture and
   steal for clients whose protocol version has them. Each owns its frame kinds; this
   object only dispatches frames to them and tells them of flow control, detach and resume.
4. A v4 session outlives its SSH connection for the agent's grace period (`resume_timeout`):
   its TUN, addresses, nft state and capture stay, steal gives the pod its connections back,
   reading pauses (the kernel's queues fill and drop: nothing is held without bound here), and
   a new connection authenticated with the same client key may take it over with RESUME and
   the session's secret.
5. When the client leaves, or the grace period ends, the features stop in reverse order and
   the counters are logged.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import SessionPlane
from mirrord_tun.agent.features import AgentTunnel, Capture, Stealing
from mirrord_tun.agent.target import read_resolv_conf
from mirrord_tun.channel import FrameSession
from mirrord_tun.feature import Features
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters

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
        self.features = Features()
        self.plane: SessionPlane | None = None
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
        handler = self.features.handlers.get(kind)
        if handler is not None:
            handler(body)
        elif kind == ClientMsg.HELLO and self._starting is None:
            self._starting = asyncio.create_task(self._start(body))
        elif kind == ClientMsg.RESUME and self._starting is None and self.plane is None:
            self._resume(body)
        elif kind == ClientMsg.STATS:
            self.features.on_stats()
            stats = dict(self.counters)
            stats["dropped_frames_oversized"] = self.chan.reader.oversized
            self.write(protocol.control(AgentMsg.STATS, stats))
        else:
            self.counters["dropped_frames_unexpected"] += 1
            log.debug("session %s: unexpected %s frame, %d bytes", self.sid, protocol.kind_name(kind), len(body))

    def on_pause(self) -> None:
        self.features.pause_writing()

    def on_resume(self) -> None:
        self.features.resume_writing()

    def on_closed(self, exc: Exception | None) -> None:
        if self._closed or self._grace is not None:
            return
        grace = self.agent.resume_timeout
        # exc is None when the client closed the channel or said goodbye (SSH disconnect): it is done.
        if (exc is not None and self._resumable and self.plane is not None
                and self.version >= protocol.RESUME_VERSION and grace > 0):
            self.features.on_detach()
            self._grace = asyncio.get_running_loop().call_later(grace, self._expire)
            log.info("session %s: connection lost (%s); kept for %g s", self.sid, exc, grace)
            return
        self._end()

    def _end(self) -> None:
        self._closed = True
        self.features.pause_writing()  # nothing more is read; the features stop in _teardown
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
        if target is None or target is self or not target._resumable_by(self.key_fingerprint, secret):
            # One answer for all of these: no hint which part was wrong.
            return self._refuse_resume("no such session to resume (unknown, expired, or not yours)", sid)
        target.reattach(self.chan, self.peer)

    def _resumable_by(self, key_fingerprint: str, secret: str) -> bool:
        return (self.welcome is not None and not self._closed and self.version >= protocol.RESUME_VERSION
                and hmac.compare_digest(self.key_fingerprint.encode(), key_fingerprint.encode())
                and hmac.compare_digest(self.secret.encode(), secret.encode()))

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
        self.features.on_resume()

    async def _start(self, body: bytes) -> None:
        try:
            version = _hello_version(body)
            resolv_conf = await _resolver(self.agent)
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
        stealing = Stealing(self.agent.ns, plane, self.write, self.counters, f"{self.sid} (from {self.peer})",
                            lambda: self._closed)
        tunnel = AgentTunnel(self.agent.ns, plane, self.write, self.counters, lambda: stealing.used)
        if self._closed:  # the client left while we were setting up
            await self.features.start(tunnel)  # only so that _teardown closes the plane
            await self._teardown()
            return
        self.welcome = self._welcome(plane, resolv_conf)
        self.write(protocol.control(AgentMsg.WELCOME, self.welcome.to_json()))
        await self.features.start(tunnel)
        if version >= protocol.MIRROR_VERSION:
            await self.features.start(Capture(self.agent.ns, plane, self.write, self.counters, self.sid))
        if version >= protocol.STEAL_VERSION:
            await self.features.start(stealing)
        log.info("session %s from %s: tunnel %s via %s, pod %s", self.sid, self.peer,
                 ",".join(plane.client_addrs), plane.tun.name if plane.tun else "?",
                 ",".join(plane.pod_addrs + plane.pod_addrs6))

    def _welcome(self, plane: SessionPlane, resolv_conf: str) -> protocol.Welcome:
        welcome = protocol.Welcome(self.version, self.sid, plane.client_addr, plane.agent_addr, plane.mtu,
                                   plane.pod_addrs, resolv_conf, client_addr6=plane.client_addr6,
                                   agent_addr6=plane.agent_addr6, pod_addrs6=plane.pod_addrs6,
                                   ipv6_off=plane.ipv6_off)
        if self.version >= protocol.RESUME_VERSION:
            welcome.secret, welcome.resume_timeout = self.secret, self.agent.resume_timeout
        return welcome

    async def _teardown(self) -> None:
        plane, self.plane = self.plane, None
        await self.features.stop()
        if plane is not None:
            _log_closed(self.sid, self.counters)
        self.agent.sessions.discard(self)


async def _resolver(agent: "Agent") -> str:
    """The container's resolv.conf, or "" (the session starts without it) if it cannot be read now."""
    # In bounded threads with a time limit: the file is the container's, and its file system may hang.
    try:
        return await agent.resolver_workers.call(read_resolv_conf, agent.target, agent.files.serve_fs)
    except OSError as e:  # busy or too slow
        log.warning("not reporting a resolver: %s", e.strerror)
        return ""


def _log_closed(sid: str, c: Counters) -> None:
    log.info("session %s closed: %d packets / %d bytes in, %d packets / %d bytes out, "
             "dropped: %s", sid, c["packets_in"], c["bytes_in"], c["packets_out"],
             c["bytes_out"], {k: v for k, v in c.items() if k.startswith("dropped_")} or "none")


def _hello_version(body: bytes) -> int:
    """The protocol version both ends speak, from the client's HELLO; ValueError if too old."""
    hello = protocol.parse_control(body)
    version = min(int(hello.get("version", 0)), protocol.VERSION)
    if version < protocol.MIN_VERSION:
        raise ValueError(f"client protocol {hello.get('version')} is older than {protocol.MIN_VERSION}")
    return version
