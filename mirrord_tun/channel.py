"""One SSH channel carrying protocol frames, for either end.

asyncssh calls the session object; this one splits the byte stream into frames
and hands each to an `Endpoint`, and passes flow-control callbacks through so
the endpoint can stop reading its TUN while the channel is full. Frames go out
and come in through sshfast where it can carry them (one copy, one cipher pass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import asyncssh

from mirrord_tun import sshfast
from mirrord_tun.protocol import FrameReader

if TYPE_CHECKING:
    from mirrord_tun.pump import TunPump


class Endpoint(Protocol):
    def on_frame(self, kind: int, body: bytes | memoryview) -> None: ...
    def on_pause(self) -> None: ...
    def on_resume(self) -> None: ...
    def on_closed(self, exc: Exception | None) -> None: ...
    def packet_sink(self) -> tuple[int, TunPump] | None:
        """The frame kind a packet pump takes, and the pump (Features.packet_sink); an endpoint
        without this method gets every frame through on_frame."""


class Sender(Protocol):
    """Where a pump's frames go: the endpoint's `write` (which counts what a closed connection
    drops), and the FrameSession it writes to, `chan`, on whose open channel the C path sends."""
    chan: FrameSession

    def write(self, data: bytes | sshfast.OutFrame) -> None: ...


class FrameSession(asyncssh.SSHClientSession[bytes], asyncssh.SSHServerSession[bytes]):
    takes_memoryview = True  # sshfast may hand data_received a memoryview of the plaintext

    def __init__(self, endpoint: Endpoint | None = None) -> None:
        self.endpoint = endpoint
        self.reader = FrameReader()
        self.chan: asyncssh.SSHChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan

    def data_received(self, data: bytes | memoryview, datatype: asyncssh.DataType) -> None:
        if self.endpoint is None:
            return
        if one := self.reader.whole(data):
            self.endpoint.on_frame(*one)
            return
        for kind, body in self.reader.feed(data):
            self.endpoint.on_frame(kind, body)

    def native_sink(self) -> tuple[int, TunPump, int, tuple] | None:
        """For sshfast's C path: the PACKETS kind this channel's endpoint hands to a pump, the
        pump, its TUN and its check; None where frames must go through data_received."""
        sink = getattr(self.endpoint, "packet_sink", None)
        found = sink() if sink is not None else None
        if found is None:
            return None
        kind, pump = found
        where = pump.native_sink()
        return None if where is None else (kind, pump, *where)

    def pause_writing(self) -> None:
        if self.endpoint:
            self.endpoint.on_pause()

    def resume_writing(self) -> None:
        if self.endpoint:
            self.endpoint.on_resume()

    def eof_received(self) -> bool:
        return False  # close the channel; the endpoint sees connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        if self.endpoint:
            self.endpoint.on_closed(exc)

    def write(self, data: bytes | sshfast.OutFrame) -> bool:
        """Send a frame (the pump's built in place: sshfast.OutFrame); False if the channel is
        closing (or not open yet), which drops it, never raises: packets and copies race the
        loss of the connection, and nothing retries them."""
        chan = self.chan
        if chan is None:
            return False
        if sshfast.send(chan, data):  # only on an open channel: is_closing() would say False
            return True
        if chan.is_closing():
            return False
        try:
            chan.write(bytes(data))
        except (BrokenPipeError, asyncssh.Error):
            return False
        return True
