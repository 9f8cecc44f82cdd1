"""Where every byte of one mirrored TCP stream went: delivered to the program, or lost and why.

The program's kernel acknowledging bytes does not mean the program read them:
a server that closes after its 1000th keep-alive request throws away what came
after. So a byte counts as delivered once the program answered after it was
written (it read the request), or its connection ended the normal way; until
then it is in flight, and the last RETAIN bytes in flight are kept, so they can
be written again on a new connection if the program closes on them.

Counters, in bytes: `mirror_delivered_bytes`, and `mirror_undelivered_bytes_<reason>` with
reason one of
- `reset`: still unwritten when the client's RST (or a hole in the copies) had to be passed on;
- `program_closed`: the program closed the connection on them and they could not be written again;
- `session_end`: waiting when the session ended;
- `stuck`, `spill_limit`, `spill_failed`, `connect_failed`: the connection was given up that way;
- `linger`: the program kept its end open LINGER after the client's FIN.
Together they add up to `mirror_tcp_bytes` once no connection is open.
"""
from __future__ import annotations

from mirrord_tun.pump import Counters

RETAIN = 256 * 1024  # unanswered bytes kept per connection to write again if the program closes on them


class Ledger:
    """The bytes of one stream that were written toward the program but not yet answered."""

    def __init__(self, counters: Counters) -> None:
        self._c = counters
        self.inflight = 0
        self._retained: bytearray | None = bytearray()  # the same bytes; None past RETAIN
        self.answers = 0  # answers on the current connection
        self._blind_retry = False  # a new connection after the program closed one without answering

    def written(self, data: bytes) -> None:
        self.inflight += len(data)
        if self._retained is not None:
            if len(self._retained) + len(data) > RETAIN:
                self._retained = None
            else:
                self._retained += data

    def answered(self) -> None:
        """The program sent something: it read what was written before."""
        self.answers += 1
        self.delivered(self.inflight)
        self.inflight = 0
        self._retained = bytearray()

    def delivered(self, n: int) -> None:
        self._c["mirror_delivered_bytes"] += n

    def lost(self, reason: str, n: int) -> None:
        if n:
            self._c[f"mirror_undelivered_bytes_{reason}"] += n

    def settle(self, reason: str, unsent: int) -> None:
        """The connection ends: of the bytes in flight, `unsent` never left our socket."""
        unsent = min(unsent, self.inflight)
        self.delivered(self.inflight - unsent)
        self.lost(reason, unsent)
        self.inflight = 0
        self._retained = bytearray()

    def take_replay(self) -> bytes | None:
        """The program closed first: the unanswered bytes to write again on a new connection, or
        None if they cannot be (too many kept, or it never answered there: a program that fails on
        a request must not get it again and again)."""
        if self._retained is None or not self.answers:
            return None
        replay = bytes(self._retained)
        self.inflight, self._retained, self.answers = 0, bytearray(), 0
        return replay

    def replay_after_close(self) -> bytes | None:
        """The program closed while the client's stream goes on: what to write again on a new
        connection (maybe nothing), or None: give up (the caller settles what is in flight).

        Without a replay, what it took unanswered is lost; what waits may still go, once: it may
        only be exiting (the session ends), or close every connection it gets."""
        replay = self.take_replay()
        if replay is not None:
            return replay
        if self._blind_retry:
            return None
        self._blind_retry = True
        self.settle("program_closed", self.inflight)
        return b""
