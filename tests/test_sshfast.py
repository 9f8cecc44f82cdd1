"""sshfast against asyncssh itself: real connections over loopback, frames both ways.

What must hold: every frame arrives whole, in order and byte-exact, whichever path carried it
(the fast one, asyncssh's when the window is full, around a key exchange); other channels on
the same connection still get bytes; and a byte changed on the wire ends the connection
instead of reaching the peer (seen from the attacker's side: a relay that flips one bit).
"""
from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import asyncssh
import pytest

from mirrord_tun import protocol, sshfast, sshopts
from mirrord_tun.channel import FrameSession
from mirrord_tun.protocol import ClientMsg

SUBSYSTEM = "frames"


class _Collect:
    """An Endpoint that keeps what arrives (and, on the server, sends it back)."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.session: FrameSession | None = None
        self.echo = False
        self.closed = asyncio.get_running_loop().create_future()

    def on_frame(self, kind: int, body: bytes | memoryview) -> None:
        self.frames.append((kind, bytes(body)))
        if self.echo and self.session:
            self.session.write(protocol.frame(kind, bytes(body)))

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass

    def on_closed(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoints: list[_Collect]) -> None:
        self._endpoints = endpoints

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        sshopts.skip_ignore_padding(conn)  # as agent/server.py does
        sshfast.Receiver(conn)

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> FrameSession:
        end = _Collect()
        end.echo = True
        session = _Subsystem(end)
        end.session = session
        self._endpoints.append(end)
        return session


class _Subsystem(FrameSession):
    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == SUBSYSTEM

    def exec_requested(self, command: str) -> bool:
        return True  # the plain second channel of test_a_plain_channel_still_gets_bytes


async def _pair(relay: Any = None, **opts: Any) -> tuple[Any, asyncssh.SSHClientConnection, FrameSession, _Collect, list]:
    served: list[_Collect] = []
    server = await asyncssh.listen("127.0.0.1", 0, server_factory=lambda: _Server(served),
                                   server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                   window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE,
                                   encryption_algs=sshopts.CIPHERS[:1], line_editor=False,
                                   encoding=None, **opts)
    port = server.sockets[0].getsockname()[1]
    if relay:
        port = await relay(port)
    conn = await asyncssh.connect("127.0.0.1", port, username="t", known_hosts=None, client_keys=None,
                                  agent_path=None, config=None, encryption_algs=sshopts.CIPHERS[:1], **opts)
    sshopts.skip_ignore_padding(conn)
    sshfast.Receiver(conn)
    mine = _Collect()
    session = FrameSession(mine)
    await conn.create_session(lambda: session, subsystem=SUBSYSTEM, encoding=None,
                              window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE)
    return server, conn, session, mine, served


async def _until(cond: Any, what: str) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _run(coro: Any, loop: str = "asyncio") -> Any:
    """On asyncio's loop, or on uvloop (which the CLI runs: its transports differ, e.g. in how
    they read into a buffered protocol)."""
    if loop == "uvloop":
        return pytest.importorskip("uvloop").run(asyncio.wait_for(coro, 120))
    return asyncio.run(asyncio.wait_for(coro, 120))


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def _frames(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    # Sizes around the edges: tiny, a packet, past the batch limit, and past the 256 KiB
    # message size (asyncssh splits those; the reader joins them again).
    sizes = [rng.choice([1, 40, 1500, 65000, 160 * 1024, 300 * 1024]) for _ in range(n)]
    return [os.urandom(s) for s in sizes]


@LOOPS
def test_frames_round_trip_whole_in_order_past_the_window(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    fast: list[bool] = []
    real_send = sshfast.send
    monkeypatch.setattr(sshfast, "send", lambda chan, parts: fast.append(real_send(chan, parts)) or fast[-1])

    async def go() -> None:
        server, conn, session, mine, _ = await _pair()
        try:
            bodies = _frames(120, 1)  # about 14 MB: more than the 8 MiB window, both ways
            buf = bytearray(sshfast.HEADROOM + 400 * 1024)
            for body in bodies:
                # As the pump sends: the frame built in a buffer reused for every frame.
                whole = protocol.frame(ClientMsg.PACKETS, body)
                buf[sshfast.HEADROOM : sshfast.HEADROOM + len(whole)] = whole
                assert session.write(sshfast.OutFrame(buf, sshfast.HEADROOM, sshfast.HEADROOM + len(whole)))
            await _until(lambda: len(mine.frames) == len(bodies), "the echoes")
            assert mine.frames == [(ClientMsg.PACKETS, b) for b in bodies]
        finally:
            conn.close()
            server.close()
    _run(go(), loop)
    assert fast.count(True) > 20, "the fast path carried (almost) nothing"
    assert False in fast, "the window never filled: the fallback went untested"


@LOOPS
def test_a_key_exchange_in_the_middle_of_the_stream(loop: str) -> None:
    async def go() -> None:
        # Both ends renew their keys after every MB they send: several times in this test.
        server, conn, session, mine, _ = await _pair(rekey_bytes=1_000_000)
        try:
            first_keys = conn._send_encryption
            sent: list[bytes] = []
            for round_ in range(4):
                for body in _frames(15, 10 + round_):
                    session.write(protocol.frame(ClientMsg.PACKETS, body))
                    sent.append(body)
                await asyncio.sleep(0.05)
            await _until(lambda: len(mine.frames) == len(sent), "the echoes")
            assert [b for _, b in mine.frames] == sent
            assert conn._send_encryption is not first_keys, "no key exchange happened"
        finally:
            conn.close()
            server.close()
    _run(go(), loop)


def test_a_plain_channel_still_gets_bytes() -> None:
    """A channel whose session did not ask for memoryviews (the agent's SFTP channel) gets bytes."""
    got: list[type] = []

    class Plain(asyncssh.SSHClientSession):
        def data_received(self, data: bytes, datatype: Any) -> None:
            got.append(type(data))

    async def go() -> None:
        server, conn, session, mine, served = await _pair()
        try:
            chan, _ = await conn.create_session(Plain, "x", encoding=None)
            # The server's FrameSession echoes frames; on this channel they reach Plain.
            chan.write(protocol.frame(ClientMsg.STATS, b"y" * 1000))
            await _until(lambda: bool(got), "the plain channel's data")
            assert set(got) == {bytes}
        finally:
            conn.close()
            server.close()
    _run(go())


@LOOPS
def test_a_flipped_bit_on_the_wire_ends_the_connection(loop: str) -> None:
    """The attacker sits on the path: after the handshake it flips one bit in our data."""
    flipped: list[int] = []

    async def relay(port: int) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            seen = 0

            async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, tamper: bool) -> None:
                nonlocal seen
                while data := await r.read(65536):
                    if tamper:
                        seen += len(data)
                        if seen > 200_000 and not flipped:  # well past the handshake and login
                            data = bytearray(data)
                            data[len(data) // 2] ^= 0x01
                            flipped.append(seen)
                    w.write(bytes(data))
                w.close()
            await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False), return_exceptions=True)
        relay_server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return relay_server.sockets[0].getsockname()[1]

    async def go() -> None:
        server, conn, session, mine, served = await _pair(relay)
        try:
            body = os.urandom(60_000)
            for _ in range(20):
                session.write(protocol.frame(ClientMsg.STATS, body))
            await _until(lambda: served and served[0].closed.done(), "the server to drop the channel")
            assert flipped
            assert all(b == body for _, b in served[0].frames)  # nothing altered got through
            assert len(served[0].frames) < 20
        finally:
            conn.close()
            server.close()
    _run(go(), loop)


def test_frames_held_while_reading_is_paused_arrive_intact() -> None:
    """A paused channel keeps what arrives (as views of the decrypted message) until it resumes:
    the buffer sshfast decrypts into must not be reused under it."""
    async def go() -> None:
        server, conn, session, mine, _ = await _pair()
        try:
            assert session.chan is not None
            session.chan.pause_reading()
            bodies = _frames(30, 7)
            for body in bodies:
                session.write(protocol.frame(ClientMsg.PACKETS, body))
            await _until(lambda: len(session.chan._recv_buf) >= 10, "echoes held by the paused channel")
            session.chan.resume_reading()
            await _until(lambda: len(mine.frames) == len(bodies), "the echoes")
            assert mine.frames == [(ClientMsg.PACKETS, b) for b in bodies]
        finally:
            conn.close()
            server.close()
    _run(go())


@LOOPS
def test_the_socket_is_read_into_sshfast_once_the_connection_is_ours(loop: str) -> None:
    """Past login, both ends' transports read into sshfast's buffer (a buffered protocol), under
    asyncio and under uvloop (which the CLI runs); frames still arrive whole and in order."""
    async def go() -> None:
        server, conn, session, mine, served = await _pair()
        try:
            bodies = _frames(40, 3)
            for body in bodies:
                session.write(protocol.frame(ClientMsg.PACKETS, body))
            await _until(lambda: len(mine.frames) == len(bodies), "the echoes")
            assert mine.frames == [(ClientMsg.PACKETS, b) for b in bodies]
            assert isinstance(conn._transport.get_protocol(), sshfast._ReadInto)
            assert served[0].session is not None and served[0].session.chan is not None
            server_conn = served[0].session.chan._conn
            assert isinstance(server_conn._transport.get_protocol(), sshfast._ReadInto)
        finally:
            conn.close()
            server.close()
    _run(go(), loop)
