"""The bytes of one mirrored stream not yet written toward the program, with its turn boundaries.

A `Spill` (memory, then disk) plus where each client turn starts in it
(reassembly.Data.turn), so delivery can stop at a boundary until the program
answered the turn before: when the program then closes the connection (a
keep-alive limit), the next request has not been written into a socket it
throws away. `requeue` puts the bytes to write again in front, after such a close.
"""
from __future__ import annotations

import collections

from mirrord_tun.mirror.spill import Spill, SpillTotals


class Backlog:
    def __init__(self, totals: SpillTotals) -> None:
        self._totals = totals
        self.spill = Spill(totals)
        self._turns: collections.deque[int] = collections.deque()  # offsets where a turn starts
        self._pushed = 0  # offsets count bytes pushed since the spill was made
        self._popped = 0

    def __len__(self) -> int:
        return len(self.spill)

    def push(self, data: bytes, turn: bool = False) -> None:
        """Raises OSError when there is no room on disk (the bytes are then not queued)."""
        self.spill.push(data)
        if turn:
            self._turns.append(self._pushed)
        self._pushed += len(data)

    def at_turn(self) -> bool:
        """The next byte starts a new turn."""
        return bool(self._turns) and self._turns[0] <= self._popped

    def pass_turn(self) -> None:
        self._turns.popleft()

    def pop(self, limit: int) -> bytes:
        """Up to `limit` of the oldest bytes, never across the next turn boundary."""
        if self._turns:
            limit = min(limit, self._turns[0] - self._popped)
        out = self.spill.pop(limit)
        self._popped += len(out)
        return out

    def requeue(self, replay: bytes, chunk: int) -> None:
        """`replay` goes in front of what waits (a new spill: it cannot be prepended in place)."""
        old, turns, popped = self.spill, self._turns, self._popped
        self.spill, self._turns, self._pushed, self._popped = Spill(self._totals), collections.deque(), 0, 0
        try:
            self.push(replay)
            shift = self._pushed - popped
            while len(old):
                self.push(old.pop(chunk))
            self._turns.extend(t + shift for t in turns)
        finally:
            old.close()

    def close(self) -> None:
        self.spill.close()
        self._turns.clear()
