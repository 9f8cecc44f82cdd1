"""What a session feature is, for either end, and the set of them one link carries.

A link (run.py's LocalSession with link.py, agent/session.py's AgentSession) owns the
connection to the peer: HELLO/WELCOME, loss, resume, counters. Everything else a session
does (the TUN pump, the mirror, steal, mounts) is a `Feature` plugged into it: it names the
frame kinds it owns and hears the link's events. A new feature is a new class and one
`Features.start` call; the link's dispatch and teardown do not change.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mirrord_tun.pump import TunPump

log = logging.getLogger("mirrord-ns")
Handler = Callable[[bytes], None]  # one frame's body; may raise protocol.Malformed


class Feature:
    """One feature of a session. Every hook does nothing unless overridden."""

    def frames(self) -> dict[int, Handler]:
        """The frame kinds from the peer this feature owns, and who takes each."""
        return {}

    async def start(self) -> None:
        """Set up; a SetupError here ends the session before its command starts."""

    async def stop(self) -> None:
        """Undo what start did. Called once, in reverse order of start, also after failures."""

    def pause_writing(self) -> None:
        """The connection's send buffer is full: stop producing frames."""

    def resume_writing(self) -> None:
        """The send buffer drained: produce frames again."""

    def on_detach(self) -> None:
        """The connection dropped; the session may be resumed on a new one."""

    def on_resume(self) -> None:
        """The session goes on over a new connection."""

    def on_lost(self) -> None:
        """The session is over for good (no resume will come); stop is still to follow."""

    def on_stats(self) -> None:
        """The session's counters are about to be read: bring this feature's share up to date."""

    def packet_pump(self) -> TunPump | None:
        """The pump that takes this feature's frames as its PACKETS, if it has one (and has started):
        sshfast's C path then writes them to its TUN itself, without the frame's handler."""
        return None


class Features:
    """The features of one session in start order, and which one owns each frame kind."""

    def __init__(self) -> None:
        self._started: list[Feature] = []
        self.handlers: dict[int, Handler] = {}
        self._owners: dict[int, Feature] = {}

    async def start(self, feature: Feature) -> None:
        """Register `feature`'s frame kinds, then start it (registered first: its peer may answer at once).
        Even if its start fails, `stop` stops it."""
        frames = feature.frames()
        if taken := set(frames) & set(self.handlers):
            raise ValueError(f"frame kinds {sorted(taken)} already have an owner")
        self.handlers.update(frames)
        self._owners.update(dict.fromkeys(frames, feature))
        self._started.append(feature)
        await feature.start()

    def packet_sink(self) -> tuple[int, TunPump] | None:
        """The frame kind whose owner has a packet pump, and the pump (see Feature.packet_pump)."""
        for kind, feature in self._owners.items():
            if (pump := feature.packet_pump()) is not None:
                return kind, pump
        return None

    # The link's events, told to every feature in start order.
    def pause_writing(self) -> None:
        for f in self._started:
            f.pause_writing()

    def resume_writing(self) -> None:
        for f in self._started:
            f.resume_writing()

    def on_detach(self) -> None:
        for f in self._started:
            f.on_detach()

    def on_resume(self) -> None:
        for f in self._started:
            f.on_resume()

    def on_lost(self) -> None:
        for f in self._started:
            f.on_lost()

    def on_stats(self) -> None:
        for f in self._started:
            f.on_stats()

    async def stop(self) -> None:
        """Stop every feature in reverse order; one failing does not keep the others up (the first
        failure is raised once all are stopped). A feature takes its frames until it is stopped:
        the tunnel still carries packets while the mirror or steal before it winds down."""
        first: Exception | None = None
        while self._started:
            f = self._started.pop()
            try:
                await f.stop()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the rest are stopped
                log.debug("stopping %s failed", type(f).__name__, exc_info=True)
                first = first or e
            for kind in f.frames():
                self.handlers.pop(kind, None)
                self._owners.pop(kind, None)
        if first is not None:
            raise first
