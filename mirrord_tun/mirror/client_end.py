"""The client's end of one mirrored TCP stream (its FIN or RST), passed on to the program.

It is held until every byte is in the socket and the program has answered, or
for ANSWER_WAIT at most: a FIN right behind the last request would make a
program that reads on until EOF drop its answer. Then a FIN goes (SHUT_WR) and
the program has LINGER to close its end, or, for the client's RST, a reset.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from mirrord_tun.mirror.tcp_writer import TcpWriter

ANSWER_WAIT = 5.0  # the client's FIN waits this long for the program's answer
LINGER = 30.0  # after the client's FIN, how long the program may keep its end open


class ClientEnd:
    """`reset(reason)` closes the connection abortively, for the client's RST or after LINGER."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: TcpWriter, reset: Callable[[str], None]) -> None:
        self._loop = loop
        self._writer = writer
        self._reset = reset
        self.seen = False
        self._abort = False  # the client's end was a RST: abortive close once everything is written
        self._fin: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    def came(self, reset: bool) -> None:
        self.seen = True
        self._abort = reset

    def written(self) -> None:
        """Every byte is in the socket: pass the end on now, or after the program's answer."""
        if self.seen and self._fin is None and self._linger is None:
            if not self._writer.ledger.inflight:
                self._send()
            else:
                self._fin = self._loop.call_later(ANSWER_WAIT, self._send)

    def answered(self) -> bool:
        """The program answered; True if the end waited for that (it is passed on now)."""
        if self._fin is None:  # set only once nothing waits
            return False
        self._send()
        return True

    def normal(self) -> bool:
        """The program closing now is the normal way: after the client's FIN and all its bytes."""
        return self._linger is not None or (self.seen and not self._abort and not len(self._writer.spill))

    def _send(self) -> None:
        if self._fin is not None:
            self._fin.cancel()
            self._fin = None
        t = self._writer.transport
        if self._abort:
            self._reset("reset")
        elif t is not None and not t.is_closing() and self._linger is None:
            t.write_eof()
            self._linger = self._loop.call_later(LINGER, self._reset, "linger")

    def cancel(self) -> None:
        for timer in (self._fin, self._linger):
            if timer:
                timer.cancel()
        self._fin = self._linger = None
