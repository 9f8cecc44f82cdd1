"""sshfast against asyncssh itself: real connections over loopback, frames both ways.

What must hold: every frame arrives whole, in order and byte-exact, whichever path carried it
(the fast one, asyncssh's when the window is full, around a key exchange); other channels on
the same connection still get bytes; and a byte changed on the wire ends the connection
instead of reaching the peer (seen from the attacker's side: a relay that flips one bit).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import types
from collections import Counter
from typing import Any, AsyncIterator

import asyncssh
import pytest

from mirrord_tun import protocol, sshfast, sshopts
from mirrord_tun.channel import FrameSession
from mirrord_tun.native import datapath
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import VNET_HDR_LEN, TunPump, source_is

SUBSYSTEM = "frames"


class _Collect:
    """An Endpoint that keeps what arrives (and, on the server, sends it back)."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.session: FrameSession | None = None
        self.echo = False
        self.closed = asyncio.get_running_loop().create_future()
        self.debug: list[str] = []  # SSH_MSG_DEBUG texts (the server's)

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

    def debug_msg_received(self, msg: str, lang: str, always_display: bool) -> None:
        for end in self._endpoints:
            end.debug.append(msg)

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
@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_frames_round_trip_whole_in_order_past_the_window(monkeypatch: pytest.MonkeyPatch, loop: str,
                                                          native: bool) -> None:
    if not native:  # as if the C packet path were not built: sshfast's own Python
        monkeypatch.setattr(sshfast, "datapath", None)
    elif datapath is None:
        pytest.skip("the C packet path is not built (no compiler)")
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


def _bit_flipper(flipped: list[int], after: int = 200_000) -> Any:
    """A relay for _pair that flips one bit in what the client sends, once `after` bytes (well past
    the handshake and login) went through; `flipped` gets the byte count where it did."""
    async def relay(port: int) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            seen = 0

            async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter, tamper: bool) -> None:
                nonlocal seen
                while data := await r.read(65536):
                    if tamper:
                        seen += len(data)
                        if seen > after and not flipped:
                            data = bytearray(data)
                            data[len(data) // 2] ^= 0x01
                            flipped.append(seen)
                    w.write(bytes(data))
                w.close()
            await asyncio.gather(copy(reader, up_w, True), copy(up_r, writer, False), return_exceptions=True)
        relay_server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return relay_server.sockets[0].getsockname()[1]
    return relay


@LOOPS
def test_a_flipped_bit_on_the_wire_ends_the_connection(loop: str) -> None:
    """The attacker sits on the path: after the handshake it flips one bit in our data."""
    flipped: list[int] = []
    relay = _bit_flipper(flipped)

    async def go() -> None:
        server, conn, session, mine, served = await _pair(relay)
        try:
            body = os.urandom(60_000)
            for _ in range(20):
                session.write(protocol.frame(ClientMsg.STATS, body))
            await _until(lambda: served and served[0].closed.done(), "the server to drop the channel")
            assert flipped
            assert isinstance(served[0].closed.result(), asyncssh.MACError)  # asyncssh's own verdict
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


# The C packet path (native.py): the server's endpoint hands ClientMsg.PACKETS to a pump, as the
# agent's does, and sshfast writes their packets to its "TUN" itself (a SOCK_SEQPACKET pair here,
# which keeps packet boundaries as a TUN does; it holds less, so the tests send in steps).
SOURCE = "100.64.0.1"
needs_c = pytest.mark.skipif(datapath is None, reason="the C packet path is not built (no compiler)")


def _tun_packet(payload: bytes, source: str = SOURCE) -> bytes:
    """A plain IPv4 packet behind a zero virtio-net header, as a TUN hands it out."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton(source), socket.inet_aton("198.18.0.20"))
    return bytes(VNET_HDR_LEN) + ip + payload


def _body(packets: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(p)) + p for p in packets)


# The pump below only takes packets in; its reader never runs.
_NO_SENDER = types.SimpleNamespace(chan=types.SimpleNamespace(chan=None), write=lambda frame: None)


class _Tun:
    """The server's pump on a datagram pair; `seen` gets, in order, every packet written to the
    "TUN" and every other frame (as ("frame", body)), so their interleaving can be checked."""

    def __init__(self) -> None:
        self.tun, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.tun, self.peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.pump = TunPump(self.tun.fileno(), _NO_SENDER, AgentMsg.PACKETS, admit_out=None,
                            admit_in=source_is(SOURCE), counters=Counter())
        self.seen: list[tuple[str, bytes]] = []
        self.python_frames = 0  # PACKETS frames that came the Python way: the C path wrote the others

    def attach(self, end: _Collect) -> None:
        end.packet_sink = lambda: (ClientMsg.PACKETS, self.pump)  # type: ignore[attr-defined]
        on_frame = end.on_frame

        def frame(kind: int, body: bytes | memoryview) -> None:
            if kind == ClientMsg.PACKETS:  # the Python path: to the pump, as the link would
                self.python_frames += 1
                self.pump.deliver(body)
            self.drain()
            self.seen.append(("frame", bytes(body)))
            on_frame(kind, body)
        end.on_frame = frame  # type: ignore[method-assign]

    def drain(self) -> None:
        while True:
            try:
                self.seen.append(("packet", self.peer.recv(1 << 17)))
            except BlockingIOError:
                return

    def close(self) -> None:
        self.tun.close()
        self.peer.close()


@contextlib.asynccontextmanager
async def _tunnel_pair(relay: Any = None) -> AsyncIterator[tuple[FrameSession, _Collect, _Collect, _Tun]]:
    """_pair whose server end hands PACKETS to a pump on a _Tun: the client's session, the client's
    and the server's endpoints, the _Tun; all closed on the way out."""
    server, conn, session, mine, served = await _pair(relay)
    tun = _Tun()
    try:
        tun.attach(served[0])
        yield session, mine, served[0], tun
    finally:
        conn.close()
        server.close()
        tun.close()


@needs_c
@LOOPS
def test_tunnel_packets_go_to_the_tun_in_c_in_order_with_every_other_frame(monkeypatch: pytest.MonkeyPatch,
                                                                             loop: str) -> None:
    """Past the 8 MiB window (the C path stops where a window adjust is due, asyncssh's does it),
    with control frames in between: every packet written once, in the order sent."""
    reads: list[int] = []
    real = datapath.received

    def received(receiver: Any, nbytes: int) -> None:  # the transport's buffer_updated, in C
        reads.append(nbytes)
        real(receiver, nbytes)
    monkeypatch.setattr(datapath, "received", received)

    async def go() -> None:
        async with _tunnel_pair() as (session, _, _, tun):
            rng = random.Random(5)
            want: list[tuple[str, bytes]] = []
            for i in range(300):  # ~12 MB, in steps of up to 3 frames (~150 KB), each let through first
                if i % 37 == 0:
                    marker = f"marker {i}".encode()
                    session.write(protocol.frame(ClientMsg.STATS, marker))
                    want.append(("frame", marker))
                packets = [_tun_packet(os.urandom(rng.choice([1, 100, 1400, 24_000]))) for _ in range(rng.randint(1, 2))]
                session.write(protocol.frame(ClientMsg.PACKETS, _body(packets)))
                want += [("packet", p) for p in packets]
                if i % 3 == 2:
                    await _until(lambda: (tun.drain(), len(tun.seen))[1] >= len(want), "the packets sent so far")
            await _until(lambda: (tun.drain(), len(tun.seen))[1] >= len(want), "every packet and frame")
            assert tun.seen == want
            assert tun.pump.counters["packets_in"] == sum(1 for k, _ in want if k == "packet")
            assert tun.python_frames < 30, "the C path delivered (almost) nothing"
    _run(go(), loop)
    assert len(reads) > 50, "the socket's reads did not go to the C"


@needs_c
def test_hostile_tunnel_frames_are_counted_and_the_session_goes_on() -> None:
    """From a hostile peer: spoofed sources, a bad virtio-net header, bodies whose lengths lie."""

    async def go() -> None:
        async with _tunnel_pair() as (session, mine, _, tun):
            good = _tun_packet(b"good")
            bad_vnet = bytes([0x10]) + good[1:]  # a flag a TUN never sets
            for body in (_body([_tun_packet(b"spoofed", "100.64.0.9"), good]), _body([bad_vnet]),
                         struct.pack("!I", 1000) + good, struct.pack("!I", 0), b"\x00\x00", _body([good])):
                session.write(protocol.frame(ClientMsg.PACKETS, body))
            session.write(protocol.frame(ClientMsg.STATS, b"end"))
            await _until(lambda: bool(mine.frames), "the echo of the last frame")
            tun.drain()
            assert [b for k, b in tun.seen if k == "packet"] == [good, good]
            c = tun.pump.counters
            assert (c["dropped_spoofed"], c["dropped_bad_vnet"], c["dropped_frames_malformed"]) == (1, 1, 3)
            assert tun.python_frames == 0  # all of them judged by the C
    _run(go())


@needs_c
@LOOPS
def test_other_messages_between_the_tunnels_leave_the_connection_whole(loop: str) -> None:
    """SSH messages that are not channel data (SSH_MSG_DEBUG here) right after the tunnel's, often
    the last of a read: the C leaves each to asyncssh with its ciphertext, and carries on after it."""
    async def go() -> None:
        async with _tunnel_pair() as (session, mine, served, tun):
            assert session.chan is not None
            conn = session.chan._conn
            want: list[bytes] = []
            for i in range(40):
                want.append(_tun_packet(f"packet {i}".encode()))
                session.write(protocol.frame(ClientMsg.PACKETS, _body([want[-1]])))
                conn.send_debug(f"debug {i}")
                await _until(lambda: (tun.drain(), len(tun.seen))[1] >= len(want), "the packet")
            session.write(protocol.frame(ClientMsg.STATS, b"end"))
            await _until(lambda: bool(mine.frames), "the echo of the last frame")
            assert [b for k, b in tun.seen if k == "packet"] == want
            assert served.debug == [f"debug {i}" for i in range(40)]
    _run(go(), loop)


@needs_c
def test_a_flipped_bit_ends_the_connection_before_the_tun() -> None:
    """The attacker on the path again, now against the C path: no altered packet is written."""
    flipped: list[int] = []
    relay = _bit_flipper(flipped, after=300_000)

    async def go() -> None:
        async with _tunnel_pair(relay) as (session, _, server_end, tun):
            packet = _tun_packet(os.urandom(30_000))
            for _ in range(40):
                session.write(protocol.frame(ClientMsg.PACKETS, _body([packet])))
                await asyncio.sleep(0.002)
                tun.drain()
            await _until(lambda: server_end.closed.done(), "the server to drop the channel")
            tun.drain()
            assert flipped
            assert isinstance(server_end.closed.result(), asyncssh.MACError)
            assert all(p == packet for k, p in tun.seen if k == "packet")
            assert 0 < len(tun.seen) < 40
    _run(go())


@needs_c
def test_a_stopped_pump_gets_no_more_packets_from_the_c_path() -> None:
    """The C path keeps the pump it found; once the pump stops (the session ending), what comes
    next goes the Python way, never to the TUN the pump had."""

    async def go() -> None:
        async with _tunnel_pair() as (session, mine, _, tun):
            before, after = _tun_packet(b"before"), _tun_packet(b"after")
            session.write(protocol.frame(ClientMsg.PACKETS, _body([before])))
            await _until(lambda: (tun.drain(), len(tun.seen))[1] >= 1, "the first packet")
            assert tun.python_frames == 0
            tun.pump.stop()
            session.write(protocol.frame(ClientMsg.PACKETS, _body([after])))
            session.write(protocol.frame(ClientMsg.STATS, b"end"))
            await _until(lambda: any(b == b"end" for _, b in mine.frames), "the echo of the last frame")
            tun.drain()
            assert [b for k, b in tun.seen if k == "packet"] == [before]
            assert tun.python_frames == 1
    _run(go())


@needs_c
@LOOPS
def test_a_pump_sends_its_tun_in_c_in_order_across_key_exchanges(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """The TUN's wake-up in C (pump_out), over a real connection that renews its keys every MB:
    what the C cannot send during a key exchange goes through asyncssh, and nothing it sends
    later overtakes that. The server echoes every frame; the packets come back once, in order."""
    unsent: list[int] = []
    real_unsent = TunPump._unsent

    def counted(self: TunPump, end: int) -> None:
        unsent.append(end)
        real_unsent(self, end)
    monkeypatch.setattr(TunPump, "_unsent", counted)

    async def go() -> None:
        server, conn, session, mine, _ = await _pair(rekey_bytes=1_000_000)
        tun, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (tun, peer):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            out = types.SimpleNamespace(chan=session, write=session.write)
            counters: Counter[str] = Counter()
            pump = TunPump(tun.fileno(), out, ClientMsg.PACKETS, source_is(SOURCE), source_is(SOURCE), counters)
            assert pump._reader[0] is datapath.pump_out
            pump.start()
            rng = random.Random(7)
            sent = [_tun_packet(os.urandom(rng.choice([1, 100, 1400, 30_000]))) for _ in range(400)]
            for i in range(0, len(sent), 20):  # ~6 MB in steps the socket pair holds
                for p in sent[i : i + 20]:
                    peer.send(p)
                await _until(lambda: counters["packets_out"] >= i + 20 or counters["packets_out"] == len(sent),
                             "the pump to read the step")
            await _until(lambda: sum(len(protocol.unpack_packets(b)) for _, b in mine.frames) >= len(sent), "the echoes")
            assert [bytes(p) for _, b in mine.frames for p in protocol.unpack_packets(b)] == sent
            assert counters["frames_out"] == len(mine.frames) > 2 * len(unsent)  # most went out in C
            pump.stop()
        finally:
            conn.close()
            server.close()
            tun.close()
            peer.close()
    _run(go(), loop)
    assert unsent, "no frame met a key exchange: the fallback went untested"


@needs_c
def test_the_c_send_advances_asyncssh_as_the_python_send_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """datapath.send_data against sshfast.send's Python: for the same frames, the same sequence
    numbers, rekey count and window used, the same refusals, and the peer reads every frame."""
    async def go() -> None:
        server, conn, session, mine, _ = await _pair()
        try:
            chan = session.chan
            assert chan is not None
            buf = bytearray(sshfast.HEADROOM + 300 * 1024 + sshfast.TAILROOM)
            sent: list[bytes] = []

            def one(body: bytes, native: bool) -> tuple[bool, int, int, int]:
                monkeypatch.setattr(sshfast, "datapath", datapath if native else None)
                before = (conn._send_seq, conn._rekey_bytes_sent, chan._send_window)
                whole = protocol.frame(ClientMsg.PACKETS, body)
                buf[sshfast.HEADROOM : sshfast.HEADROOM + len(whole)] = whole
                ok = sshfast.send(chan, sshfast.OutFrame(buf, sshfast.HEADROOM, sshfast.HEADROOM + len(whole)))
                if ok:
                    sent.append(body)
                return (ok, conn._send_seq - before[0], conn._rekey_bytes_sent - before[1],
                        before[2] - chan._send_window)

            for size in (1, 15, 16, 17, 1500, 65_000, 200 * 1024):
                body = os.urandom(size)
                assert one(body, True) == one(body, False), size
                await asyncio.sleep(0)
            window = chan._send_window
            chan._send_window = 10  # less than any frame: both leave it to asyncssh, nothing changed
            assert one(b"x" * 20, True) == one(b"x" * 20, False) == (False, 0, 0, 0)
            chan._send_window = window
            await _until(lambda: len(mine.frames) == len(sent), "the echoes")
            assert mine.frames == [(ClientMsg.PACKETS, b) for b in sent]
        finally:
            conn.close()
            server.close()
    _run(go())
