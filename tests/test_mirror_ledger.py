"""The mirror's byte accounting and turn bookkeeping, pure: reassembly's turns, Backlog, Ledger."""
from __future__ import annotations

import struct

from mirrord_tun.mirror.backlog import Backlog
from mirrord_tun.mirror.ledger import RETAIN, Ledger
from mirrord_tun.mirror.reassembly import Data, Reassembler
from mirrord_tun.mirror.spill import SpillTotals
from mirrord_tun.pump import Counters
from test_mirror_reassembly import ACK, PSH, SYN, _ip


def _seg(seq: int, ack: int, payload: bytes, flags: int = ACK | PSH) -> bytes:
    return _ip(6, struct.pack("!HHIIBBHHH", 40000, 80, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload)


def test_a_new_acknowledgement_starts_a_turn() -> None:
    r = Reassembler(Counters())
    r.feed(_seg(999, 0, b"", SYN), 0.0)
    turns = []
    # request 1 in two segments, the pod answers (ack moves), request 2; a duplicate changes nothing
    for pkt in (_seg(1000, 5001, b"GET /1 "), _seg(1007, 5001, b"HTTP/1.1\r\n\r\n"), _seg(1019, 5100, b"GET /2"),
                _seg(1019, 5100, b"GET /2")):
        turns += [e.turn for e in r.feed(pkt, 0.0) if isinstance(e, Data)]
    assert turns == [False, False, True]


def test_backlog_stops_at_a_turn_and_requeues_in_front() -> None:
    b = Backlog(SpillTotals())
    b.push(b"req1-")
    b.push(b"more", turn=False)
    b.push(b"req2", turn=True)
    assert b.pop(100) == b"req1-more" and b.at_turn()
    b.pass_turn()
    assert not b.at_turn()
    b.push(b"req3", turn=True)
    b.requeue(b"again", 4)  # the program closed on "again": it goes first, the turns move with the rest
    assert b.pop(100) == b"againreq2" and b.at_turn()
    b.pass_turn()
    assert b.pop(100) == b"req3" and len(b) == 0
    b.close()


def test_ledger_adds_up_and_replays_only_after_an_answer() -> None:
    c = Counters()
    led = Ledger(c)
    led.written(b"x" * 10)
    assert led.take_replay() is None  # never answered on this connection: not written again
    led.answered()
    led.written(b"y" * 7)
    assert led.take_replay() == b"y" * 7 and led.inflight == 0
    led.written(b"z" * 5)
    led.settle("reset", unsent=3)
    led.lost("session_end", 4)
    assert c["mirror_delivered_bytes"] == 10 + 2 and c["mirror_undelivered_bytes_reset"] == 3
    assert c["mirror_undelivered_bytes_session_end"] == 4


def test_ledger_keeps_no_more_than_retain() -> None:
    led = Ledger(Counters())
    led.answered()
    led.written(b"a" * (RETAIN + 1))
    assert led.take_replay() is None and led.inflight == RETAIN + 1


def test_a_program_that_closes_unanswered_gets_one_more_connection_without_the_bytes_it_took() -> None:
    c = Counters()
    led = Ledger(c)
    led.answered()
    led.written(b"r" * 6)
    assert led.replay_after_close() == b"r" * 6  # answered before: written again
    led.written(b"q" * 4)
    assert led.replay_after_close() == b""  # never answered there: a new connection, nothing again
    assert c["mirror_undelivered_bytes_program_closed"] == 4 and led.inflight == 0
    led.written(b"p" * 3)
    assert led.replay_after_close() is None  # and only once: give up, the caller settles the 3
    assert led.inflight == 3
