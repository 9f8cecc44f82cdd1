"""The agent's end of one client's link: a channel, and a session that may outlive it.

Frames from the client go to the session's features by kind (feature.py); HELLO, RESUME and
STATS are the link's own. Flow control pauses and resumes the features' writers. A v4 session
whose connection drops is kept for the agent's grace period (`resume_timeout`): its features
hear `on_detach` (reading pauses, steal gives the pod its connections back) and, when a new
channel authenticated with the same client key brings RESUME and the session's secret,
`on_resume` after the session moved to it (`reattach`). When the grace period ends the session
ends as if the client had left.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from mirrord_tun import protocol
from mirrord_tun.agent.dataplane import SessionPlane
from mirrord_tun.channel import FrameSession
from mirrord_tun.feature import Features
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump

if TYPE_CHECKING:
    from mirrord_tun.agent.server import Agent

log = logging.getLogger("mirrord-ns.agent")


class ClientLink:
    """One client's link: its channel, the session's id and secret, dispatch, detach and resume.
    The session itself (session.py) says what HELLO starts (`_start`) and how it ends (`_end`)."""

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
        self.plane: SessionPlane | None = None  # once HELLO opened it; None again from the teardown on
        self.version = 0
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self._resumable = True  # False once the agent stops or this channel tried RESUME

    def close(self, why: str | None = None) -> None:
        """End the session now, connected or detached (the agent is stopping); `why` goes to the client."""
        self._resumable = False
        if why and self._grace is None and self.welcome is not None:
            self.write(protocol.control(AgentMsg.ERROR, {"error": why}))
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
    def packet_sink(self) -> tuple[int, TunPump] | None:
        return self.features.packet_sink()

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
        """HELLO: open the session."""
        raise NotImplementedError

    def _end(self) -> None:
        """Close the session (not resumable any more): stop its features, forget it."""
        raise NotImplementedError
