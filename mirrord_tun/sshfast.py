"""Channel data on our own SSH connections without asyncssh's generic per-message path.

Profiled in bulk (docs/benchmarks.md), asyncssh copied every 256 KiB message about ten times
on the way out (bytearray, String(), two prefixes, padding, the ciphertext split and joined
again) and as often on the way in (its input buffer is a `bytes` grown and cut per packet),
built a new AESGCM object per message, and ran several layers of Python per message. The
copies cost more than the encryption. Both ends of the connection are ours, so for the one
message that matters, SSH_MSG_CHANNEL_DATA on a channel whose session takes memoryviews, this
module does the same work in one copy and one cipher pass each way:

- out: the pump builds its frame in a buffer it reuses (TUN packets read in place), leaving
  room around it for the message header and padding; AES-GCM reads it from there and writes
  straight into the buffer the transport sends, itself reused while the socket takes each
  message at once (other frames: one join, then the same);
- in: once the connection is ours the socket is read straight into our buffer (a buffered
  protocol, see Receiver), packets are decrypted from there into a reused buffer, and the
  channel data handed on as a memoryview of the plaintext.

Where the C packet path is built (native.py), the per-message work in between is C's:
`send_data` is `send` for the pump's frame (the same checks, message and state updates), and
`open_batch` decrypts what arrived and writes the tunnel's packets to the pump's TUN itself (the
channel found by _NativeInput), advancing asyncssh's state and the pump's counters, stopping at
the first message that is anything else, which then takes the path below. The transport calls
the C for each read itself (`received`, `get_buffer`): a read of the tunnel's data runs no Python;
any other case it hands to the Receiver's Python. The cipher calls are the same AES-GCM object's
either way.

Still SSH on the wire, with asyncssh's negotiated keys, IVs, sequence numbers, rekey limits
and channel windows, which this code advances exactly as asyncssh would. Everything else
(other messages, other ciphers, before authentication, during a key exchange, a full
window) goes through asyncssh untouched; tests/test_sshfast.py checks the private
attributes this relies on, so an asyncssh release that changes them fails a test, not a
session.
"""
from __future__ import annotations

import asyncio
import functools
import os
import struct
import sys
import time
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.encryption import GCMEncryption
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mirrord_tun import sshopts
from mirrord_tun.native import datapath

_U32 = struct.Struct("!I")
_DATA_HEAD = struct.Struct("!BBII")  # padding length, message type, recipient channel, data length
_DATA_FIELDS = struct.Struct("!II")  # recipient channel, data length (after padlen and type)
_HEAD_LEN = _DATA_HEAD.size  # plaintext bytes before the data
_TAG = 16
_SEQ_MASK = 0xFFFFFFFF
# MIRRORD_NS_SSHFAST=0 leaves every message to asyncssh: for A/B runs (scripts/bench --env) and
# to rule this module out when debugging. Read once, at import.
# encrypt_into/decrypt_into are recent in cryptography; asyncssh accepts older releases (a distribution's)
ENABLED = (os.environ.get("MIRRORD_NS_SSHFAST", "1") != "0" and hasattr(AESGCM, "encrypt_into")
           and hasattr(AESGCM, "decrypt_into"))
# asyncssh re-arms its keepalive timer (a new loop timer) on every received chunk; once a second
# is as good for a 5 s keepalive interval (sshopts) and saves a timer per message.
_KEEPALIVE_RESET = 1.0


class _Padding:
    """Random padding bytes taken from a pool: one getrandom() per 4 KiB, not one per message.
    Each byte is used once, so the padding stays as random as asyncssh's os.urandom() per message."""

    def __init__(self) -> None:
        self._pool, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._pool):
            self._pool, self._pos = os.urandom(4096), 0
        self._pos += n
        return self._pool[self._pos - n : self._pos]


_padding = _Padding()


def _aead(enc: Any) -> AESGCM | None:
    """The AES-GCM object for one direction's key, made once per key (asyncssh makes one per message);
    None when the direction does not use AES-GCM."""
    if type(enc) is not GCMEncryption:
        return None
    cipher = enc._cipher
    aead = getattr(cipher, "_mrd_aead", None)
    if aead is None:
        aead = cipher._mrd_aead = AESGCM(cipher._key)
    return aead


HEADROOM = _HEAD_LEN  # free bytes an OutFrame keeps before its frame: the message's header
TAILROOM = 32  # ... and after it: the padding (at most a block and 3 bytes)


class OutFrame:
    """A frame built in place, in a buffer its owner reuses: `buf[start:end]`, with HEADROOM
    bytes free before it and TAILROOM after, where `send` writes the message's header and
    padding, so the frame is encrypted from where it was read, never copied."""

    __slots__ = ("buf", "start", "end")

    def __init__(self, buf: bytearray, start: int, end: int) -> None:
        self.buf, self.start, self.end = buf, start, end

    def __bytes__(self) -> bytes:
        return bytes(self.buf[self.start : self.end])


def send(chan: asyncssh.SSHChannel, frame: bytes | OutFrame) -> bool:
    """Send a frame as one SSH_MSG_CHANNEL_DATA; False (nothing sent) where asyncssh must do it:
    then the caller writes through the channel, which keeps the order (we only ever go first
    while its send buffer is empty)."""
    if not ENABLED:
        return False
    if datapath is not None and type(frame) is OutFrame:
        # The pump's frame: the same checks, message and state updates in C (_datapath.c's send_data).
        return datapath.send_data(chan, frame.buf, frame.start, frame.end)
    conn = chan._conn
    if conn is None:  # the channel is gone
        return False
    enc = conn._send_encryption
    aead = _aead(enc)
    size = len(frame) if isinstance(frame, bytes) else frame.end - frame.start
    if (aead is None or conn._compressor or not conn._kex_complete or not conn._auth_complete
            or chan._send_state != "open" or chan._send_buf or size > chan._send_window
            or size > chan._send_pktsize or conn._transport is None or not size
            or conn._rekey_bytes_sent >= conn._rekey_bytes
            or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)):
        return False
    blocksize = conn._send_blocksize
    padlen = -(conn._send_enchdrlen + 9 + size) % blocksize  # 9: type + recipient + length
    if padlen < 4:
        padlen += blocksize
    pktlen = _HEAD_LEN + size + padlen
    total = 4 + pktlen + _TAG
    out = _out_buffer(conn, total)
    if not _encrypt(aead, enc._cipher, frame, padlen, chan._send_chan, out, total):
        return False
    transport = conn._transport
    transport.write(memoryview(out)[:total])
    # Sent at once (the usual case): the buffer is ours again for the next message. Otherwise the
    # transport queued a view of it, and the next message gets a new one.
    if transport.get_write_buffer_size():
        conn._mrd_out = None
    conn._send_seq = (conn._send_seq + 1) & _SEQ_MASK
    conn._rekey_bytes_sent += pktlen
    chan._send_window -= size
    return True


def _encrypt(aead: AESGCM, cipher: Any, frame: bytes | OutFrame, padlen: int, send_chan: int, out: bytearray,
             total: int) -> bool:
    """send's message in Python: the header and padding around the frame, encrypted into `out`."""
    size = total - 4 - _TAG - _HEAD_LEN - padlen
    head = _DATA_HEAD.pack(padlen, MSG_CHANNEL_DATA, send_chan, size)
    if isinstance(frame, bytes):
        plain: bytes | memoryview = b"".join([head, frame, _padding.take(padlen)])
    else:
        buf, start, end = frame.buf, frame.start - HEADROOM, frame.end + padlen
        if start < 0 or end > len(buf):
            return False
        buf[start : frame.start] = head
        buf[frame.end : end] = _padding.take(padlen)
        plain = memoryview(buf)[start:end]
    _U32.pack_into(out, 0, total - 4 - _TAG)
    with memoryview(out) as view:
        aead.encrypt_into(cipher._iv, plain, view[:4], view[4:total])
    if isinstance(plain, memoryview):
        plain.release()
    cipher._update_iv()
    return True


def _out_buffer(conn: Any, size: int) -> bytearray:
    """The connection's buffer for outgoing packets, at least `size` bytes. Reused from message to
    message: a new bytearray per message costs an allocation and a memset of ~160 KiB (8% of
    the sender's CPU in bulk)."""
    out: bytearray | None = getattr(conn, "_mrd_out", None)
    if out is None or len(out) < size:
        out = conn._mrd_out = bytearray(max(size, _PACKET_MAX))
    return out


class _Decrypted:
    """Stands in for the receive cipher while asyncssh parses one packet we already decrypted."""

    def __init__(self, plain: bytes) -> None:
        self._plain = plain

    def decrypt_header(self, _seq: int, first: bytes, header_len: int) -> tuple[bytes, bytes]:
        return first, first[:header_len]

    def decrypt_packet(self, *_args: object) -> bytes:
        return self._plain


# The largest packet between our ends (sshopts.MAX_PKTSIZE of channel data, asyncssh's 1024 bytes
# for the rest of the message, the length and the tag): each reused buffer is made this size once,
# not grown step by step (every step would leave a freed buffer behind in the heap).
_PACKET_MAX = 4 + sshopts.MAX_PKTSIZE + 1024 + _TAG
_SMALL = 4096  # packets decrypted into a new bytes object, not the reused buffer (see _decrypt)
# How much a read may bring at least: uvloop reads 256 KiB at a time into a buffer of its own.
_READ_SIZE = 256 * 1024
if datapath is not None:
    datapath.bind(GCMEncryption, _aead, _PACKET_MAX, _KEEPALIVE_RESET)


class _Input:
    """Received bytes not yet handled, `buf[start:end]`, in a buffer the socket reads into directly.
    Never resized in place (the transport may hold a view of it during a read): replaced to grow."""

    __slots__ = ("buf", "start", "end", "_whole")

    def __init__(self, size: int = _READ_SIZE + _PACKET_MAX) -> None:
        self.buf = bytearray(size)  # by default: a whole read after the start of the largest packet
        self.start = self.end = 0
        self._whole = memoryview(self.buf)  # what an empty input offers a read: made once

    def __len__(self) -> int:
        return self.end - self.start

    def clear(self) -> None:
        self.start = self.end = 0

    def room(self, n: int) -> memoryview:
        """At least `n` free bytes after the data: the data moves to the front first if needed
        (the start of one packet, once per many reads), or to a bigger buffer."""
        if not self.end and n <= len(self.buf):
            return self._whole
        if len(self.buf) - self.end < n:
            size = self.end - self.start
            old = self._whole
            if size + n > len(self.buf):
                self.buf = bytearray(max(size + n, 2 * len(self.buf)))
                self._whole = memoryview(self.buf)
            self._whole[:size] = old[self.start : self.end]
            self.start, self.end = 0, size
        return self._whole[self.end :]

    def append(self, data: bytes) -> None:
        self.room(len(data))[: len(data)] = data
        self.end += len(data)


class Receiver:
    """Takes over a connection's input (see the module's docstring).

    First through the hook `_recv_data`, which asyncssh's `data_received` calls after appending
    the data to its (then empty: adding to empty bytes copies nothing) input buffer; once the
    connection is ours, through `_ReadInto`, which reads the socket straight into `_Input`.
    """

    def __init__(self, conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._slow = conn._recv_data
        if not ENABLED:
            return
        self._boundary = conn._recv_pkthdr  # the handler asyncssh waits in between packets
        self._in_packet = conn._recv_packet  # ... and after a packet's first block
        self._input = _Input()  # received and not yet handled, while we own the input
        self._alive = 0.0  # when we last told asyncssh the peer is alive
        self._plain = bytearray(_PACKET_MAX)  # decrypted packets, one at a time (see _decrypt)
        self._buffered = False  # whether we are the transport's protocol yet
        self._native = _NativeInput(conn) if datapath is not None else None
        conn._recv_data = self.recv_data  # type: ignore[method-assign]

    def _ours(self) -> bool:
        """Between two packets, with nothing left in asyncssh's buffer, AES-GCM and no compression."""
        conn = self._conn
        return (not conn._inpbuf and conn._recv_handler == self._boundary and conn._auth_complete
                and not conn._decompressor and type(conn._recv_encryption) is GCMEncryption)

    def _take_over(self) -> bool:
        """Take the input from asyncssh where it can be taken: with AES-GCM, also in the middle of
        a packet (its length is sent in the clear, so asyncssh kept the first block as received)."""
        conn = self._conn
        if not conn._auth_complete or conn._decompressor or _aead(conn._recv_encryption) is None:
            return False
        if conn._recv_handler == self._in_packet:
            self._input.append(conn._packet)
            conn._packet = b""
            conn._recv_handler = self._boundary
        elif conn._recv_handler != self._boundary:
            return False  # asyncssh is busy with a message (an asynchronous handler)
        return True

    def recv_data(self) -> None:
        """asyncssh's hook: data it received (before we are the transport's protocol, or handed
        to it by buffer_updated) is in its input buffer."""
        if not self._input and not self._take_over():
            self._slow()
            return
        conn = self._conn
        data, conn._inpbuf = conn._inpbuf, b""
        self._input.append(data)
        self._handle()
        if not self._buffered and conn._transport is not None:
            self._buffered = True
            # After this callback, not inside the transport's own read path.
            asyncio.get_running_loop().call_soon(_ReadInto(self).install)

    def _handle(self, pending: int = 0) -> None:
        """Every whole packet in the input while the connection stays ours; first, with `pending`,
        the packet of that length just before the input that the C decrypted into _plain and
        left to us (datapath.received)."""
        conn = self._conn
        now = time.monotonic()
        if now - self._alive >= _KEEPALIVE_RESET:
            conn._reset_keepalive_timer()
            self._alive = now
        inp = self._input
        back = 4 + pending + _TAG if pending else 0  # the pending packet's ciphertext, before the input
        try:
            with memoryview(inp.buf)[inp.start - back : inp.end] as src:
                pos, ours = self._packets(src, pending)
                if not ours and pos < len(src):
                    # asyncssh takes over (a message it handles asynchronously, or a cipher we do not do).
                    conn._inpbuf = bytes(src[pos:])
        except Exception as exc:  # noqa: BLE001 - asyncssh's own _recv_data ends the connection too
            self._fail(exc)
            return
        inp.start += pos - back
        if conn._inpbuf:
            inp.clear()
            if conn._recv_handler == self._boundary:
                self._slow()
        elif inp.start == inp.end:  # all handled (the usual case): the next read goes to the front
            inp.start = inp.end = 0

    def _fail(self, exc: Exception) -> None:
        self._input.clear()
        _end(self._conn, exc)

    def _give_back(self) -> None:
        """What just arrived, to asyncssh's own path as bytes (its turn, or it holds the start of these)."""
        inp = self._input
        data = bytes(memoryview(inp.buf)[inp.start : inp.end])
        inp.clear()
        self._conn.data_received(data)

    def _packets(self, src: memoryview, pending: int) -> tuple[int, bool]:
        """Handle every whole packet in `src` while the connection stays ours (with `pending`, the
        first is one the C decrypted already, see _handle); the bytes used, and whether it still
        is (only a packet asyncssh handled can change that)."""
        conn = self._conn
        n, pos = len(src), 4 + pending + _TAG if pending else 0
        native = self._native
        sink = native.sink() if native is not None else None
        with memoryview(src) as view:
            while pending or n - pos >= 4 + _TAG:
                if pending:
                    plain, pktlen, pending = memoryview(self._plain)[:pending], pending, 0
                elif sink is not None:
                    # The tunnel's packets in C, up to the first message that is anything else;
                    # it advances asyncssh's state and the pump's counters itself.
                    chan, kind, pump, fd, check = sink
                    pos, _, stopped, pktlen = datapath.open_batch(src, pos, n, self._plain, conn, chan, kind, fd,
                                                                  check, pump.counters)
                    if stopped == 0:
                        break
                    if stopped == 1:
                        sink = None  # this one (and the rest of this read) through the loop below
                        continue
                    plain = memoryview(self._plain)[:pktlen]
                else:
                    (pktlen,) = _U32.unpack_from(src, pos)
                    if pktlen > conn._max_recv_pktlen:
                        raise asyncssh.ProtocolError("Max packet size exceeded")
                    end = pos + 4 + pktlen + _TAG
                    if end > n:
                        break
                    if len(self._plain) < pktlen:
                        self._plain = bytearray(pktlen)
                    plain = _decrypt(conn, self._plain, view[pos + 4 : end], view[pos : pos + 4])
                    pos = end
                handled = _channel_data(conn, plain)
                if not handled:
                    _through_asyncssh(conn, bytes(plain), bytes(view[pos - 4 - pktlen - _TAG : pos]))
                del plain
                # Whoever kept a view of the plaintext (a paused channel queues it) keeps the
                # buffer: the next packet gets a new one. Ours and the argument are 2 references.
                if sys.getrefcount(self._plain) > 2:
                    self._plain = bytearray(len(self._plain))
                if not handled and not self._ours():
                    return pos, False
                if sink is not None:
                    sink = native.sink()  # that message may have changed the channel (a close, a pause)
        return pos, True


def _decrypt(conn: Any, into: bytearray, sealed: memoryview, length: memoryview) -> memoryview:
    """One packet's plaintext, in `into`, a buffer reused from packet to packet and long enough
    (not a new bytes object of ~160 KiB per message)."""
    enc = conn._recv_encryption
    aead = _aead(enc)
    assert aead is not None
    pktlen = len(sealed) - _TAG
    if pktlen <= _SMALL:  # a new bytes object costs less than the view of a reused buffer
        plain = memoryview(aead.decrypt(enc._cipher._iv, sealed, length))
    else:
        plain = memoryview(into)[:pktlen]
        aead.decrypt_into(enc._cipher._iv, sealed, length, plain)  # InvalidTag: Receiver._fail ends the connection
    enc._cipher._update_iv()
    return plain


def _end(conn: Any, exc: Exception) -> None:
    """The connection ends over a packet that failed (in our Python or the C's), as asyncssh ends it."""
    if isinstance(exc, (asyncssh.DisconnectError, InvalidTag)):
        # InvalidTag: a packet that failed authentication, in our decryption or the C's.
        err = exc if isinstance(exc, asyncssh.DisconnectError) else asyncssh.MACError("MAC verification failed")
        conn._send_disconnect(err.code, err.reason, err.lang)
        conn._force_close(err)
    else:
        conn.internal_error()


class _NativeInput:
    """The C path's side of a Receiver: it finds the channel whose PACKETS a pump takes, for
    datapath.open_batch (the connection, that channel, the pump's TUN, check and counters)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._chan: Any = None  # the channel found last time
        self._found: tuple[Any, int, Any, int, tuple] | None = None  # ... and its sink, while its pump keeps its TUN

    def sink(self) -> tuple[Any, int, Any, int, tuple] | None:
        """That channel and its pump's sink (FrameSession.native_sink), while _channel_data would
        hand it data directly; None otherwise."""
        conn = self._conn
        chan = self._chan
        if chan is None or conn._channels.get(chan._recv_chan) is not chan:
            self._found = None
            chan = self._chan = next((c for c in conn._channels.values()
                                      if getattr(c._session, "native_sink", None)), None)
            if chan is None:
                return None
        if (chan._recv_state != "open" or chan._send_state != "open" or chan._recv_paused or chan._encoding
                or not getattr(chan._session, "takes_memoryview", False)):
            return None
        found = self._found
        # The sink is asked for twice a read: through the session, endpoint and features it is
        # seven calls, so it is kept while its pump still has that TUN (a stopped pump has none).
        if found is None or found[2].fd != found[3]:
            where = chan._session.native_sink()
            found = self._found = None if where is None else (chan, *where)
        return found


def _channel_data(conn: Any, plain: memoryview) -> bool:
    """Hand channel data to a session that takes memoryviews; False for anything else, and for
    anything asyncssh would refuse (it then refuses it itself, with its own error)."""
    if len(plain) < _HEAD_LEN or plain[1] != MSG_CHANNEL_DATA:
        return False
    recv_chan, size = _DATA_FIELDS.unpack_from(plain, 2)
    chan = conn._channels.get(recv_chan)
    end = _HEAD_LEN + size
    if (chan is None or not getattr(chan._session, "takes_memoryview", False) or chan._encoding
            or chan._recv_state != "open" or end != len(plain) - plain[0] or size > chan._recv_window):
        return False
    data = plain[_HEAD_LEN:end]
    window = chan._recv_window - size
    if window >= chan._init_recv_window / 2 and not chan._recv_paused and chan._send_state == "open":
        # What asyncssh's _accept_data and _deliver_data come to when no window adjust is due:
        # two calls and a dozen checks less per message.
        chan._recv_window = window
        chan._session.data_received(data, None)
    else:
        chan._accept_data(data)
    conn._recv_seq = (conn._recv_seq + 1) & _SEQ_MASK
    return True


def _through_asyncssh(conn: Any, plain: bytes, raw: bytes) -> None:
    """One packet through asyncssh's own parser, its decryption already done."""
    real = conn._recv_encryption
    stand_in = _Decrypted(plain)
    conn._recv_encryption = stand_in
    conn._inpbuf = raw
    try:
        while conn._inpbuf and conn._recv_handler():
            pass
    finally:
        if conn._recv_encryption is stand_in:  # unless the packet was NEWKEYS
            conn._recv_encryption = real


class _ReadInto(asyncio.BufferedProtocol):
    """The transport's protocol once a Receiver owns the connection's input: a buffered one, so
    the socket is read straight into the Receiver's `_Input`, and the copy the transport makes of
    each read (a new bytes object) and ours of every packet a read cut in two are gone. What
    asyncssh must see still reaches it as bytes through its `data_received`; the transport's
    other calls go to the connection unchanged."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._conn = receiver._conn
        if datapath is not None:
            # The transport calls these for every read: in C (the same work as the methods below,
            # which stay the reference), so a read of the tunnel's data runs no Python at all.
            self.get_buffer = functools.partial(datapath.get_buffer, receiver, _READ_SIZE)  # type: ignore[method-assign]
            self.buffer_updated = functools.partial(datapath.received, receiver)  # type: ignore[method-assign]

    def install(self) -> None:
        transport = self._conn._transport
        if transport is not None and not transport.is_closing() and transport.get_protocol() is self._conn:
            transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receiver._input.room(_READ_SIZE)

    def buffer_updated(self, nbytes: int) -> None:
        receiver = self._receiver
        inp = receiver._input
        had = inp.end - inp.start
        inp.end += nbytes
        if not had and not receiver._ours():
            receiver._give_back()
            return
        receiver._handle()

    def data_received(self, data: bytes) -> None:
        self._conn.data_received(data)

    def eof_received(self) -> bool | None:
        return self._conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)
        # Give the buffers (~0.8 MiB) back now, not when the collector finds this cycle: the agent
        # keeps a lost session for its resume, and a new connection can reuse the memory.
        self._receiver._input = _Input(0)
        self._receiver._plain = bytearray()
        self._conn._mrd_out = None

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()
