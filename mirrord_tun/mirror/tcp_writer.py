"""The write side of one mirrored TCP connection: the bytes toward the program, in order.

Bytes go into the socket while its write buffer has room and wait in a
`Backlog` (memory, then disk) otherwise, also while connecting. A client turn (a
new request after the pod's answer) waits at its boundary until the program
answered the one before (or GATE_WAIT), and that answer settled: bytes written
while the program still answers would be taken for answered, and lost if it then
closes. A program that takes nothing for STUCK_TIMEOUT while bytes wait is
reported (`on_stuck`). What is written goes into the `Ledger`.
"""
from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Callable

from mirrord_tun.mirror.backlog import Backlog
from mirrord_tun.mirror.ledger import Ledger
from mirrord_tun.mirror.spill import SpillTotals
from mirrord_tun.pump import Counters

WRITE_BUFFER = 256 * 1024  # in asyncio's buffer past the socket's own; the rest waits in the spill
CHUNK = 256 * 1024
STUCK_TIMEOUT = 60.0  # a program that takes nothing at all for this long while bytes wait gets a reset
GATE_WAIT = 1.0  # a client turn waits this long for the program's answer to the one before
ANSWER_SETTLE = 0.002  # and this long after the last bytes of that answer
RST_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


class TcpWriter:
    """`flush` is called again (`on_gate_open`) when a turn's wait is over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spilled: SpillTotals, counters: Counters,
                 on_gate_open: Callable[[], None], on_stuck: Callable[[], None]) -> None:
        self._loop = loop
        self._counters = counters
        self._on_gate_open = on_gate_open
        self._on_stuck = on_stuck
        self.spill = Backlog(spilled)
        self.ledger = Ledger(counters)
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._stuck: asyncio.TimerHandle | None = None
        self._gate: asyncio.TimerHandle | None = None
        self._gate_open = False  # the wait at this turn boundary is over
        self._last_answer = 0.0  # loop time

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Small: what the socket does not take waits in the spill, on disk past its memory cap.
        transport.set_write_buffer_limits(high=WRITE_BUFFER)

    def detach(self) -> None:
        """The connection is gone (a new one may follow); `stop` its timers too."""
        self.transport, self._paused = None, False

    def must_wait(self, turn: bool) -> bool:
        """New bytes cannot go into the socket now (`turn`: they start a new turn)."""
        return self.transport is None or self._paused or bool(len(self.spill)) or turn and bool(self.ledger.inflight)

    def queue(self, data: bytes, turn: bool) -> None:
        """Into the backlog; raises OSError when it has no room (disk full, a bad SPILL_DIR)."""
        filed = self.spill.spill.filed
        self.spill.push(data, turn)
        self._counters["mirror_spilled_bytes"] += self.spill.spill.filed - filed

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)  # may pause us (write buffer past `high`)
        self.ledger.written(data)

    def flush(self) -> bool:
        """Move backlog bytes into the socket while it takes them; True once all are in it."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        while not self._paused and len(self.spill):
            if self.spill.at_turn():
                wait = self._turn_wait()
                if wait > 0:
                    if self._gate is None:  # the program's answer to the previous turn comes sooner
                        self._gate = self._loop.call_later(wait, self._open_gate)
                    return False
                self.spill.pass_turn()
                self.close_gate()
            self.write(self.spill.pop(CHUNK))
        return not len(self.spill)

    def answered(self) -> None:
        """The program sent something: what was written before is delivered."""
        self.ledger.answered()
        self._last_answer = self._loop.time()

    def _turn_wait(self) -> float:
        """How long the next turn must still wait: for the program's answer to the previous one,
        then for that answer to be over (ANSWER_SETTLE without more of it)."""
        if self._gate_open:
            return 0.0
        if self.ledger.inflight:
            return GATE_WAIT
        return self._last_answer + ANSWER_SETTLE - self._loop.time()

    def _open_gate(self) -> None:
        self._gate, self._gate_open = None, True
        self._on_gate_open()

    def close_gate(self) -> None:
        """The next turn waits again (for an answer, or for it to settle)."""
        if self._gate is not None:
            self._gate.cancel()
        self._gate, self._gate_open = None, False

    def pause(self) -> None:
        self._paused = True
        self._stuck = self._loop.call_later(STUCK_TIMEOUT, self._on_stuck)

    def resume(self) -> None:
        self._paused = False
        if self._stuck:
            self._stuck.cancel()
            self._stuck = None

    def abort(self) -> int:
        """Close with a reset now; the bytes that never left our socket."""
        t = self.transport
        if t is None or t.is_closing():
            return 0
        sock = t.get_extra_info("socket")
        unsent = t.get_write_buffer_size() + _unsent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        t.abort()
        return unsent

    def stop(self) -> None:
        if self._stuck:
            self._stuck.cancel()
            self._stuck = None
        self.close_gate()


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue the program's kernel has not acknowledged."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0
