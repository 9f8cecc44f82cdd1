"""One client session inside the agent, told in five steps.

1. A channel's first frame is HELLO (a new session) or RESUME (take over a detached one, below).
2. HELLO: the session's plane is opened in the target's namespace (agent/dataplane.py: TUN,
   addresses, nft table) and WELCOME says so to the client.
3. The features (features.py) plug in: the tunnel's pump always, the mirror's capture and
   steal for clients whose protocol version has them. Each owns its frame kinds; the link
   (link.py) only dispatches frames to them and tells them of flow control, detach and resume.
4. A v4 session outlives its SSH connection for the agent's grace period (`resume_timeout`):
   its TUN, addresses, nft state and capture stay, steal gives the pod its connections back,
   reading pauses (the kernel's queues fill and drop: nothing is held without bound here), and
   a new connection authenticated with the same client key may take it over with RESUME and
   the session's secret (link.py).
5. When the client leaves, or the grace period ends, the features stop in reverse order and
   the counters are logged.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mirrord_tun import native, protocol
from mirrord_tun.agent.dataplane import SessionPlane
from mirrord_tun.agent.features import AgentTunnel, Capture, Stealing
from mirrord_tun.agent.link import ClientLink
from mirrord_tun.agent.target import read_resolv_conf
from mirrord_tun.channel import FrameSession
from mirrord_tun.protocol import AgentMsg
from mirrord_tun.pump import Counters, dropped_summary

if TYPE_CHECKING:
    from mirrord_tun.agent.server import Agent

log = logging.getLogger("mirrord-ns.agent")


class AgentSession(ClientLink):
    def __init__(self, agent: "Agent", chan: FrameSession, peer: str, key_fingerprint: str) -> None:
        super().__init__(agent, chan, peer, key_fingerprint)
        agent.sessions.add(self)

    def _end(self) -> None:
        self._closed = True
        self.features.pause_writing()  # nothing more is read; the features stop in _teardown
        asyncio.create_task(self._teardown())

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
        tunnel = AgentTunnel(self.agent.ns, plane, self, self.counters, lambda: stealing.used)
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
        log.info("session %s from %s: tunnel %s via %s, pod %s, packet path in %s", self.sid, self.peer,
                 ",".join(plane.client_addrs), plane.tun.name if plane.tun else "?",
                 ",".join(plane.pod_addrs + plane.pod_addrs6), native.describe())

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
             c["bytes_out"], dropped_summary(c))


def _hello_version(body: bytes) -> int:
    """The protocol version both ends speak, from the client's HELLO; ValueError if too old."""
    hello = protocol.parse_control(body)
    version = min(int(hello.get("version", 0)), protocol.VERSION)
    if version < protocol.MIN_VERSION:
        raise ValueError(f"client protocol {hello.get('version')} is older than {protocol.MIN_VERSION}")
    return version
