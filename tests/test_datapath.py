"""The packet path in C (_datapath.c) against its Python reference (pump.py), from a hostile peer's
side: for random, truncated and crafted packets and bodies, the C must write the same packets,
build the same frames and count the same drops as the Python. A TUN keeps packet boundaries;
so does a SOCK_SEQPACKET socket pair, which stands in for it here (no root needed). Bounded in time.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import types
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mirrord_tun
from mirrord_tun import native, pump, sshfast
from mirrord_tun.native import datapath
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import MAX_PACKET, VNET_HDR_LEN, TunPump, destination_is, source_is

needs_c = pytest.mark.skipif(datapath is None, reason="the C packet path is not built (no compiler)")
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWED = ("100.64.0.1", "fd00:100:64::1")
OTHER4, OTHER6 = bytes([100, 64, 0, 9]), bytes.fromhex("fd000100006400000000000000000009")
ALLOWED4 = bytes([100, 64, 0, 1])
ALLOWED6 = bytes.fromhex("fd000100006400000000000000000001")


@st.composite
def tun_packets(draw: Any) -> bytes:
    """A TUN packet aimed at every branch of the checks: the virtio-net header's flags, GSO type
    and offsets around their limits; IPv4, IPv6 or neither; allowed addresses or not; short."""
    small = st.sampled_from([0, 1, 2, 9, 10, 16, 19, 20, 38, 40, 48, 60, 0xFFFF]) | st.integers(0, 0xFFFF)
    vnet = struct.pack("=BBHHHH", draw(st.sampled_from([0, 1, 2, 3, 4, 0x80]) | st.integers(0, 255)),
                       draw(st.sampled_from([0, 1, 4, 0x81, 0x84, 3]) | st.integers(0, 255)),
                       draw(small), draw(small), draw(small), draw(small))
    version = draw(st.sampled_from([4, 6, 0, 5, 15]))
    size = draw(st.sampled_from([0, 10, 19, 20, 39, 40, 41, 60]) | st.integers(0, 200))
    ip = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if ip:
        ip[0] = version << 4 | draw(st.sampled_from([5, 6, 15, 0]))
    if version == 4 and size >= 20:
        ip[9] = draw(st.sampled_from([6, 17, 1]))
        ip[12:16] = draw(st.sampled_from([ALLOWED4, OTHER4]))
        ip[16:20] = draw(st.sampled_from([ALLOWED4, OTHER4]))
    if version == 6 and size >= 40:
        ip[6] = draw(st.sampled_from([6, 17, 0]))
        ip[8:24] = draw(st.sampled_from([ALLOWED6, OTHER6]))
        ip[24:40] = draw(st.sampled_from([ALLOWED6, OTHER6]))
    return vnet + bytes(ip)


def _datagram_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(MAX_PACKET + 1))
        except BlockingIOError:
            return out


class _Sender:
    """An endpoint without a connection (`chan.chan` None: the C sends through `write` too),
    recording each frame it is given under its tag."""

    def __init__(self, tag: str, sent: list[tuple[str, bytes]]) -> None:
        self.chan = types.SimpleNamespace(chan=None)
        self._tag, self._sent = tag, sent

    def write(self, frame: Any) -> None:
        self._sent.append((self._tag, bytes(frame)))


def _wake(p: TunPump) -> None:
    """What the event loop does when the pump's TUN is readable."""
    p._reader[0](*p._reader[1:])


def _pumps(fd_c: int, fd_py: int, admit_out: Any, admit_in: Any, sent: list[tuple[str, bytes]]
           ) -> tuple[TunPump, TunPump]:
    """A pump on the C path and one on Python's (as if nothing were built), each sending to `sent`."""
    c = TunPump(fd_c, _Sender("c", sent), ClientMsg.PACKETS, admit_out, admit_in, Counter())
    saved = pump.datapath
    pump.datapath = None
    try:
        py = TunPump(fd_py, _Sender("py", sent), ClientMsg.PACKETS, admit_out, admit_in, Counter())
    finally:
        pump.datapath = saved
    assert c._in_spec is not None and py._in_spec is None and c._reader[0] is datapath.pump_out
    return c, py


def _in_loop(fn: Callable[[], None]) -> None:
    async def go() -> None:
        fn()
    asyncio.run(go())


@needs_c
@FUZZ
@given(st.lists(tun_packets(), max_size=12), st.sampled_from(["source", "destination"]))
def test_a_body_from_the_peer_is_written_and_counted_as_python_does(packets: list[bytes], which: str) -> None:
    check = (source_is if which == "source" else destination_is)(*ALLOWED)
    body = b"".join(struct.pack("!I", len(p)) + p for p in packets if p)
    _differential_deliver(body, check)


@needs_c
@FUZZ
@given(st.binary(max_size=120), st.lists(tun_packets(), max_size=4))
def test_a_malformed_body_is_refused_whole_as_python_does(junk: bytes, packets: list[bytes]) -> None:
    """Lengths that run past the end, zero lengths, truncated length fields: nothing is written."""
    body = b"".join(struct.pack("!I", len(p)) + p for p in packets if p) + junk
    _differential_deliver(body, source_is(*ALLOWED))


@contextlib.contextmanager
def _two_tuns() -> Iterator[tuple[tuple[socket.socket, socket.socket], tuple[socket.socket, socket.socket]]]:
    """(tun, peer) for the C pump and the same for Python's, closed on the way out."""
    c, py = _datagram_pair(), _datagram_pair()
    try:
        yield c, py
    finally:
        for s in (*c, *py):
            s.close()


def _differential_deliver(body: bytes, check: Any) -> None:
    with _two_tuns() as ((c_in, c_out), (py_in, py_out)):
        def run() -> None:
            c, py = _pumps(c_in.fileno(), py_in.fileno(), None, check, [])
            c.deliver(memoryview(body))
            py.deliver(memoryview(body))
            assert _drain(c_out) == _drain(py_out)
            assert c.counters == py.counters
        _in_loop(run)


@needs_c
@FUZZ
@given(st.lists(tun_packets(), min_size=1, max_size=9), st.booleans())
def test_packets_read_from_the_tun_make_the_frame_python_makes(packets: list[bytes], checked: bool) -> None:
    _differential_read([p for p in packets if p], source_is(*ALLOWED) if checked else None)


@needs_c
def test_a_batch_stops_at_the_same_packet_as_python() -> None:
    """Past BATCH_BYTES the rest waits for the next frame, in both."""
    big = [bytes(VNET_HDR_LEN) + bytes([0x45]) + os.urandom(60_000) for _ in range(5)]
    _differential_read(big, None)


def _differential_read(packets: list[bytes], admit_out: Any) -> None:
    with _two_tuns() as ((c_tun, c_peer), (py_tun, py_peer)):
        for p in packets:
            c_peer.send(p)
            py_peer.send(p)
        sent: list[tuple[str, bytes]] = []

        def run() -> None:
            c, py = _pumps(c_tun.fileno(), py_tun.fileno(), admit_out, source_is(*ALLOWED), sent)
            for _ in range(len(packets) + 1):  # every frame, and one more read of a drained TUN
                _wake(c)
                _wake(py)
            assert [f for t, f in sent if t == "c"] == [f for t, f in sent if t == "py"]
            assert c.counters == py.counters
        _in_loop(run)


@needs_c
def test_a_tun_gone_under_the_pump_pauses_it() -> None:
    """EBADF and friends: the pump stops reading, as on Python's path; nothing is sent."""
    async def go() -> None:
        sent: list[tuple[str, bytes]] = []
        a, b = _datagram_pair()
        p = TunPump(a.fileno(), _Sender("c", sent), ClientMsg.PACKETS, None, source_is(*ALLOWED), Counter())
        p.start()
        a.close()
        _wake(p)
        assert not p._reading and not sent
        b.close()
    asyncio.run(go())


@needs_c
def test_with_sshfast_off_the_c_reader_leaves_every_frame_to_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """MIRRORD_NS_SSHFAST=0: the TUN is still read in C, but each frame goes out through the
    endpoint's write (asyncssh's path), the channel never looked at."""
    monkeypatch.setattr(sshfast, "ENABLED", False)
    with _two_tuns() as ((tun, peer), _):
        packet = bytes(VNET_HDR_LEN) + bytes([0x45]) + os.urandom(40)
        peer.send(packet)
        sent: list[bytes] = []

        def run() -> None:
            out = types.SimpleNamespace(write=lambda frame: sent.append(bytes(frame)))  # no `chan` to look at
            p = TunPump(tun.fileno(), out, ClientMsg.PACKETS, None, source_is(*ALLOWED), Counter())  # type: ignore[arg-type]
            _wake(p)
            assert sent == [struct.pack("!IB", 4 + len(packet), ClientMsg.PACKETS) + struct.pack("!I", len(packet)) + packet]
            assert (p.counters["packets_out"], p.counters["frames_out"]) == (1, 1)
        _in_loop(run)


@needs_c
def test_bad_arguments_raise_instead_of_touching_memory() -> None:
    buf = bytearray(100)

    def never(*_: Any) -> None:
        raise AssertionError("nothing was read, so nothing is unsent and the TUN not gone")

    def out(start: int, limit: int, check: Any) -> None:
        datapath.pump_out(-1, buf, start, limit, MAX_PACKET, check, ClientMsg.PACKETS, None, Counter(), never, never)
    with pytest.raises(ValueError):
        out(5, 1000, None)  # stop beyond the buffer
    with pytest.raises(ValueError):
        out(0, 50, None)  # no room for the frame's header before the body
    with pytest.raises(ValueError):
        out(5, 50, (99, 0, b"", b"", "x"))  # offset past the header
    with pytest.raises(ValueError):
        datapath.tun_write_batch(-1, b"", (22, 18, b"abc", b"", "x"))  # not whole addresses
    with pytest.raises(TypeError):
        datapath.tun_write_batch(-1, "text", None)
    out(5, 50, None)  # no room for a packet: nothing read
    # A sane packet the kernel refuses (here: no such fd) is counted, not raised.
    assert datapath.tun_write_batch(-1, struct.pack("!I", 30) + bytes(30), None) == (0, 0, {"dropped_rejected": 1})


def test_an_extension_built_from_another_source_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install after a `git pull` that changed the C: the old build would run old code."""
    stale = types.ModuleType("mirrord_tun._datapath")
    stale.SOURCE_SHA256 = "0" * 64  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mirrord_tun._datapath", stale)
    monkeypatch.setattr(mirrord_tun, "_datapath", stale, raising=False)
    assert native._load() is None
    monkeypatch.setenv("MIRRORD_NS_NATIVE", "0")
    assert native._load() is None  # turned off


@st.composite
def channel_messages(draw: Any) -> tuple[bytes, bool]:
    """The plaintext of one SSH packet a hostile peer (who holds the session's keys) could send:
    channel data to our channel carrying one PACKETS frame, or the same with one field lying
    (another message type, another channel, a data or frame length off, another frame kind),
    around a PACKETS body that is sane or not; and whether every field agrees."""
    packets = draw(st.lists(tun_packets(), max_size=3))
    body = b"".join(struct.pack("!I", len(p)) + p for p in packets if p)
    if draw(st.booleans()):
        body += draw(st.binary(max_size=8))  # maybe a torn length at the end
    lie = draw(st.sampled_from([None, None, None, "type", "chan", "data_len", "frame_len", "kind"]))
    kind = draw(st.sampled_from([ClientMsg.STATS, 0xFF, AgentMsg.PACKETS])) if lie == "kind" else ClientMsg.PACKETS
    frame_len = draw(st.sampled_from([len(body) + 1, len(body) - 1, 0xFFFFFFFF])) if lie == "frame_len" else len(body)
    data = struct.pack("!IB", frame_len % 2**32, kind) + body
    data_len = draw(st.sampled_from([len(data) - 1, len(data) + 1, 0xFFFFFFFF])) if lie == "data_len" else len(data)
    msg_type = draw(st.sampled_from([95, 0, 2])) if lie == "type" else 94
    chan = CHAN + 1 if lie == "chan" else CHAN
    padlen = draw(st.integers(4, 255))
    plain = struct.pack("!BBII", padlen, msg_type, chan, data_len) + data + os.urandom(padlen)
    return plain, lie is None


CHAN = 7


def _receiving(gcm: str, key: bytes, nonce: bytes) -> tuple[Any, Any, Any]:
    """asyncssh's cipher, connection and channel as open_batch reads and advances them (sshfast's
    _NativeInput hands it the real ones); `gcm`: which AES-GCM the C opens packets with."""
    cipher = types.SimpleNamespace(_mrd_aead=AESGCM(key), _iv=nonce,
                                   **({"_key": key} if gcm == "libcrypto" else {"_mrd_gcm": None}))
    conn = types.SimpleNamespace(_recv_encryption=types.SimpleNamespace(_cipher=cipher),
                                 _max_recv_pktlen=1 << 16, _recv_seq=2**32 - 2)
    chan = types.SimpleNamespace(_recv_chan=CHAN, _recv_window=1 << 30, _init_recv_window=0)
    return cipher, conn, chan


@needs_c
@pytest.mark.parametrize("gcm", ["libcrypto", "cryptography"])
@FUZZ
@given(st.lists(channel_messages(), min_size=1, max_size=4), st.sampled_from([16, 32]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)))
def test_channel_data_from_a_hostile_peer_goes_to_the_tun_as_the_python_would(gcm: str,
                                                                             messages: list[tuple[bytes, bool]],
                                                                             key: bytes) -> None:
    """open_batch on what a hostile peer with the session's keys could send: it takes a message
    only when every length and field agrees, writes exactly the packets Python's deliver writes
    for it (checked, counted alike), and leaves anything else, decrypted, to the caller. The
    messages are sealed by cryptography and opened by libcrypto (_gcm.c), or by cryptography's
    object where libcrypto is not used."""
    aead, first_nonce = AESGCM(key), os.urandom(12)
    nonce, wire, ends = bytearray(first_nonce), bytearray(), []
    for plain, _ in messages:
        length = struct.pack("!I", len(plain))
        wire += length + aead.encrypt(bytes(nonce), plain, length)
        ends.append(len(wire))
        nonce[4:] = ((int.from_bytes(nonce[4:]) + 1) % 2**64).to_bytes(8)
    check = source_is(*ALLOWED)
    with _two_tuns() as ((c_in, c_out), (py_in, py_out)):
        def run() -> None:
            c, py = _pumps(c_in.fileno(), py_in.fileno(), None, check, [])
            cipher, conn, chan = _receiving(gcm, key, first_nonce)
            pos, plain_buf, taken_all, window = 0, bytearray(1 << 16), 0, 1 << 30
            for (plain, agrees), end in zip(messages, ends):
                # One message per call (`end`): each call's verdict is that message's.
                pos, taken, stopped, stopped_len = datapath.open_batch(
                    bytes(wire), pos, end, plain_buf, conn, chan, ClientMsg.PACKETS, c_in.fileno(), check.native,
                    c.counters)
                assert pos == end
                if agrees:
                    assert (taken, stopped) == (1, 0)
                    window -= len(plain) - plain[0] - 10
                    py.deliver(memoryview(plain)[15 : len(plain) - plain[0]])
                else:
                    assert (taken, stopped, stopped_len) == (0, 2, len(plain))
                    assert bytes(plain_buf[: len(plain)]) == plain  # decrypted, for the caller's own path
                taken_all += taken
                assert _drain(c_out) == _drain(py_out)
            assert c.counters == py.counters
            assert (conn._recv_seq, chan._recv_window) == ((2**32 - 2 + taken_all) % 2**32, window)
            nonce = int.from_bytes(first_nonce[4:]) + len(messages)  # every message decrypted, taken or not
            assert cipher._iv == first_nonce[:4] + (nonce % 2**64).to_bytes(8)
            assert (type(cipher._mrd_gcm).__name__ == "PyCapsule") == (gcm == "libcrypto")
        _in_loop(run)


@needs_c
def test_libcrypto_can_be_turned_off_for_a_b_runs() -> None:
    """MIRRORD_NS_LIBCRYPTO=0 (scripts/bench --env): the C seals and opens packets with
    cryptography's object (the "cryptography" cases above), and the session's first log line
    says which. Read once per process, hence a process each."""
    def used(value: str) -> str:
        code = "from mirrord_tun.native import datapath, describe; print(datapath.libcrypto(), describe())"
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, "MIRRORD_NS_LIBCRYPTO": value},
                              capture_output=True, text=True, check=True).stdout.strip()
    assert used("1") == "True C, AES-GCM by libcrypto"
    assert used("0") == "False C, AES-GCM by cryptography"


@needs_c
@pytest.mark.parametrize("gcm", ["libcrypto", "cryptography"])
@pytest.mark.parametrize("where", ["length", "body", "tag"])
def test_a_message_changed_on_the_wire_is_refused_whole(gcm: str, where: str) -> None:
    """A relay flips one bit of a sealed message (its authenticated length, its body or its tag):
    open_batch raises InvalidTag (sshfast then ends the connection), writes none of its packets
    to the TUN, advances no state, and leaves none of the unauthenticated plaintext behind."""
    key, nonce = os.urandom(16), os.urandom(12)
    udp = b"\x30\x39\x00\x50\x00\x1a\x00\x00" + b"secret payload 18b"
    packet = bytes(VNET_HDR_LEN) + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, ALLOWED4,
                                               OTHER4) + udp
    data = struct.pack("!IB", len(packet) + 4, ClientMsg.PACKETS) + struct.pack("!I", len(packet)) + packet
    plain = struct.pack("!BBII", 4, 94, CHAN, len(data)) + data + bytes(4)
    length = struct.pack("!I", len(plain))
    wire = bytearray(length + AESGCM(key).encrypt(nonce, plain, length))
    if where == "length":  # authenticated as the AAD: a packet 16 bytes shorter, still whole on the wire
        wire[:4] = struct.pack("!I", len(plain) - 16)
    else:
        wire[20 if where == "body" else len(wire) - 1] ^= 0x01
    check = source_is(*ALLOWED)
    with _two_tuns() as ((c_in, c_out), _):
        def run() -> None:
            c, _ = _pumps(c_in.fileno(), c_in.fileno(), None, check, [])
            cipher, conn, chan = _receiving(gcm, key, nonce)
            plain_buf = bytearray(1 << 16)
            with pytest.raises(InvalidTag):
                datapath.open_batch(bytes(wire), 0, len(wire), plain_buf, conn, chan, ClientMsg.PACKETS,
                                    c_in.fileno(), check.native, c.counters)
            assert _drain(c_out) == []
            assert (cipher._iv, conn._recv_seq, chan._recv_window) == (nonce, 2**32 - 2, 1 << 30)
            if gcm == "libcrypto":  # cryptography's object makes no such promise
                assert b"secret payload" not in plain_buf
        _in_loop(run)
