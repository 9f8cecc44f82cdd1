"""The local end's link to the agent: one session over one SSH connection at a time.

It connects (dialing the agent or over a given socket), says HELLO and waits for WELCOME,
hands every frame to the feature that owns its kind (feature.py), passes the channel's flow
control and its loss on to the features, takes the session over a new connection with
RESUME (`resume`: one attempt; reconnect.py decides when and how often), and keeps the
session's counters, asking the agent for its own at the end.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Callable

import asyncssh

from mirrord_tun import protocol
from mirrord_tun.channel import FrameSession
from mirrord_tun.connect import Gone, SetupError, open_channel, printable
from mirrord_tun.feature import Features
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump, dropped_summary

log = logging.getLogger("mirrord-ns")
WELCOME_TIMEOUT = 15
_COUNTER = re.compile(r"[a-z0-9_]{1,64}")


class Refused(Gone):
    """The agent answered and said no: trying again cannot help."""


class AgentLink:
    def __init__(self, agent: str, key: asyncssh.SSHKey, pinned: asyncssh.SSHKey,
                 sock: socket.socket | None = None) -> None:
        self.agent, self.key, self.pinned = agent, key, pinned
        self.sock = sock  # SSH runs over this (a Kubernetes port-forward) instead of dialing `agent`
        # A fresh such socket for each reconnect (a new port-forward); None: dial `agent` again.
        self.new_sock: Callable[[], socket.socket] | None = None
        self.counters: Counters = Counters()
        self.features = Features()
        self.chan = FrameSession(self)
        self.conn: asyncssh.SSHClientConnection | None = None
        self.session: protocol.Welcome | None = None  # the first WELCOME: what a resume must match
        self.up = False  # a session is open on the current connection
        self.dropped = False  # the connection died under us (resumable), rather than being closed
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = loop.create_future()  # why the current connection ended
        self._welcome: asyncio.Future[protocol.Welcome] = loop.create_future()
        self._stats: asyncio.Future[dict[str, int]] | None = None
        self._ended_because: str | None = None  # what the agent said as it ended the session

    async def connect(self) -> None:
        self.conn = await open_channel(self.agent, self.key, self.pinned, self.chan, sock=self.sock)

    async def hello(self) -> protocol.Welcome:
        """HELLO, and the agent's WELCOME; the connection is closed again if that fails."""
        try:
            self.chan.write(protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION}))
            self.session = await self._welcomed()
        except BaseException:
            await _close(self.conn)
            raise
        self.up = True
        return self.session

    async def resume(self, sock: socket.socket | None) -> None:
        """One attempt: a new connection (over `sock`, else dialing), RESUME, the same WELCOME again."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        self.chan.endpoint = None  # the old channel has nothing more to say
        self.chan = FrameSession(self)
        self._welcome, self.lost, self.dropped = loop.create_future(), loop.create_future(), False
        conn = await open_channel(self.agent, self.key, self.pinned, self.chan, sock=sock)
        try:
            self.chan.write(protocol.resume(self.session.session, self.session.secret))
            welcome = await self._welcomed()
            if (welcome.session, welcome.client_addr) != (self.session.session, self.session.client_addr):
                raise Refused(f"the agent resumed another session ({printable(welcome.session)})")
        except BaseException:
            await _close(conn)
            raise
        old, self.conn = self.conn, conn
        await _close(old)
        self.up = True
        self.counters["resumed"] += 1
        log.info("session %s resumed", welcome.session)
        self.features.on_resume()

    async def _welcomed(self) -> protocol.Welcome:
        try:
            return await asyncio.wait_for(self._welcome, WELCOME_TIMEOUT)
        except asyncio.TimeoutError:
            raise SetupError(f"agent {self.agent}: no WELCOME within {WELCOME_TIMEOUT} s") from None

    def write(self, data: bytes) -> None:
        """To the current connection; while there is none, dropped and counted."""
        if not self.chan.write(data):
            self.counters["dropped_frames_closed"] += 1

    # Endpoint (channel.py)
    def packet_sink(self) -> tuple[int, TunPump] | None:
        return self.features.packet_sink()

    def on_frame(self, kind: int, body: bytes) -> None:
        handler = self.features.handlers.get(kind)
        try:
            if handler is not None:
                handler(body)
            elif kind == AgentMsg.WELCOME and not self._welcome.done():
                self._welcome.set_result(protocol.Welcome.from_json(protocol.parse_control(body)))
            elif kind == AgentMsg.ERROR:
                self._on_error(printable(protocol.parse_control(body).get("error")))
            elif kind == AgentMsg.STATS and self._stats and not self._stats.done():
                self._stats.set_result({k: v for k, v in protocol.parse_control(body).items()
                                        if type(v) is int and _COUNTER.fullmatch(k)})
            else:
                self.counters["dropped_frames_unexpected"] += 1
        except protocol.Malformed as e:
            self.counters["dropped_frames_malformed"] += 1
            if not self._welcome.done():
                self._welcome.set_exception(SetupError(f"agent sent a bad {protocol.kind_name(kind)}: {e}"))

    def _on_error(self, msg: str) -> None:
        if self._welcome.done():  # the agent ends a running session: said in the line that ends it
            self._ended_because = msg
            return
        resuming = self.session is not None
        self._welcome.set_exception(Refused(f"agent refused the session: {msg}"))
        if not resuming:  # a refused resume is said once, in the line that ends the session
            log.error("agent: %s", msg)

    def on_pause(self) -> None:
        self.features.pause_writing()

    def on_resume(self) -> None:
        self.features.resume_writing()

    def on_closed(self, exc: Exception | None) -> None:
        # May quote the agent.
        reason = printable(str(exc)) if exc else self._ended_because or "the agent closed the session"
        self.up = False
        self.features.on_detach()
        if not self._welcome.done():
            self._welcome.set_exception(SetupError(f"agent {self.agent}: {reason}"))
        if not self.lost.done():
            self.dropped = exc is not None
            self.lost.set_result(reason)

    async def close(self) -> None:
        """Stop the features (in reverse), say the counters, close the connection."""
        try:
            await self.features.stop()
        finally:
            if log.isEnabledFor(logging.INFO) and self.up:
                await self._log_counters()
            await _close(self.conn)

    async def agent_stats(self) -> dict[str, int]:
        self._stats = asyncio.get_running_loop().create_future()
        self.chan.write(protocol.control(ClientMsg.STATS, {}))
        return await asyncio.wait_for(self._stats, 5)

    async def _log_counters(self) -> None:
        c = self.counters
        log.info("local: %d packets / %d bytes sent, %d packets / %d bytes received, dropped: %s",
                 c["packets_out"], c["bytes_out"], c["packets_in"], c["bytes_in"], dropped_summary(c))
        try:
            stats = await self.agent_stats()
            log.info("agent: %s", ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        except (asyncio.TimeoutError, protocol.Malformed):
            pass


async def _close(conn: asyncssh.SSHClientConnection | None) -> None:
    if conn is None:
        return
    conn.close()
    try:
        await asyncio.wait_for(conn.wait_closed(), 2)
    except asyncio.TimeoutError:
        pass
