"""One mirrored TCP connection toward the program: its life from connect to end, and why it ended.

The bytes go through a `TcpWriter` (backlog, turn gate), the client's FIN or RST
through a `ClientEnd`. A refused connect (the program restarting) is retried
(`connect`). A program that closes first gets a new connection from the same
client address:port for the rest, with the bytes it did not answer written again
(`Ledger.replay_after_close`). However it ends, every byte is settled in the
`Ledger`: delivered, or lost for the reason it ended.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, cast

from mirrord_tun.mirror.client_end import ClientEnd
from mirrord_tun.mirror.connect import connect
from mirrord_tun.mirror.reassembly import Flow
from mirrord_tun.mirror.tcp_writer import CHUNK, RST_ON_CLOSE, TcpWriter

if TYPE_CHECKING:
    from mirrord_tun.mirror.delivery import Deliveries

log = logging.getLogger("mirrord-ns")


class TcpDelivery(asyncio.Protocol):
    """Tells its owner once, when it is over (`done`)."""

    def __init__(self, owner: Deliveries, flow: Flow, local_port: int) -> None:
        self._owner = owner
        self.flow = flow
        self._port = local_port
        self.writer = TcpWriter(owner.loop, owner.spilled, owner.counters, self._flush, self._stuck_reset)
        self.spill, self.ledger = self.writer.spill, self.writer.ledger
        self.end = ClientEnd(owner.loop, self.writer, self.reset)
        self.done = False
        self._why = ""  # why it ended, for bytes that still come
        owner.loop.create_task(self._connect())

    async def _connect(self) -> None:
        owner = self._owner
        try:
            sock = await connect(owner.ns, self.flow, self._port, owner.counters, lambda: self.done)
        except OSError as e:
            self._failed(e)
            return
        if self.done:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
            sock.close()
            return
        try:
            await owner.loop.create_connection(lambda: self, sock=sock)
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        if self.done:
            return
        self._owner.counters["mirror_connect_failed"] += 1
        self._owner.log_failure(self.flow, self._port, e)
        self._end("connect_failed", 0)

    # called by the owner with the reassembled stream
    def feed(self, data: bytes, turn: bool = False) -> None:
        """Bytes of the client's stream; `turn`: they start a new turn (reassembly.Data.turn)."""
        self._owner.counters["mirror_tcp_bytes"] += len(data)
        if self.done:
            self.ledger.lost(self._why, len(data))
            return
        if not self.writer.must_wait(turn):
            self.writer.write(data)
            return
        try:
            self.writer.queue(data, turn)
        except OSError as e:  # no spill file (disk full, a bad SPILL_DIR): this copy is lost
            self._owner.counters["mirror_spill_failed"] += 1
            log.warning("mirror: cannot spill: %s", e)
            self.reset("spill_failed")
            self.ledger.lost("spill_failed", len(data))
            return
        self._flush()

    def finish(self, reset: bool = False) -> None:
        """The client's FIN: half-close (SHUT_WR) once everything is written and answered; its RST
        (`reset`): the same wait, then an abortive close."""
        self.end.came(reset)
        self._flush()

    def superseded(self) -> None:
        """The client reused the port pair: write what waits, then end (with a reset if the
        client's end was never seen)."""
        if not self.end.seen:
            self.finish(reset=True)

    def reset(self, reason: str) -> None:
        """An abortive close now (the program sees a reset); what was not written is lost for `reason`."""
        if not self.done:
            self._end(reason, self.writer.abort())

    def _flush(self) -> None:
        """Move waiting bytes into the socket while it takes them; then maybe the FIN."""
        if not self.done and self.writer.flush():
            self.end.written()

    def _stuck_reset(self) -> None:
        self._owner.counters["mirror_reset_stuck"] += 1
        self.reset("stuck")

    def _end(self, reason: str, unsent: int) -> None:
        """Over: settle the bytes in flight (`unsent` of them never left our socket) and the spill."""
        self.ledger.settle(reason, unsent)
        self.ledger.lost(reason, len(self.spill))
        self._why = reason
        if not self.done:
            self.done = True
            self.spill.close()
            self._cancel_timers()
            self._owner.ended(self)

    def _cancel_timers(self) -> None:
        self.end.cancel()
        self.writer.stop()

    def _reconnect(self, replay: bytes) -> None:
        """The rest, from the first byte the program did not answer, on a new connection."""
        self._owner.counters["mirror_reconnects"] += 1
        waiting = len(self.spill)
        try:
            self.spill.requeue(replay, CHUNK)
        except OSError as e:
            log.warning("mirror: cannot spill: %s", e)
            self._owner.counters["mirror_spill_failed"] += 1
            self.ledger.lost("spill_failed", len(replay) + waiting - len(self.spill))
            self._end("spill_failed", 0)  # counts what did get queued again
            return
        self.writer.detach()
        self._cancel_timers()
        self._owner.loop.create_task(self._connect())

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.writer.attach(cast(asyncio.Transport, transport))
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._owner.counters["mirror_answer_bytes"] += len(data)
        self.writer.answered()
        if not self.end.answered() and len(self.spill):
            self.writer.close_gate()  # waits again, now for the answer to settle
            self._flush()

    def eof_received(self) -> bool:
        return False  # the program closed its end: close ours

    def pause_writing(self) -> None:
        self.writer.pause()

    def resume_writing(self) -> None:
        self.writer.resume()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if self.end.normal():
            self._end("program_closed", 0)  # after the client's end: the normal way
            return
        replay = self.ledger.replay_after_close()
        if replay is None:
            self._end("program_closed", self.ledger.inflight)
        else:
            self._reconnect(replay)
