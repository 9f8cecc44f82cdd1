"""Bounds on connections that have not authenticated yet, and on what they can make us log.

Anyone who reaches the agent's port can hold a connection, and one of our fds, until the
login timeout. Plain caps would let a flood lock the key holder out, so a newcomer is never
refused: when a cap is full one waiting connection is evicted instead, chosen
deterministically (unlike sshd's random MaxStartups drops):
- per source (an IPv4 address, an IPv6 /64) the source's own connections are the only
  candidates, so a flood from another address never touches the key holder's;
- at the total cap, the source holding the most waiting connections pays (a fair share: a
  flood from many addresses still leaves a key holder's one connection alone);
- among the candidates, those that have not started authenticating go first (a peer gets that
  far only after a full key exchange, which costs it far more than a connect or a version
  line), and the oldest of those first.
What stays open: a flood from the key holder's own address (in Kubernetes every port-forward
arrives from 127.0.0.1) evicts the key holder's connection if it brings a per-source cap's
worth of new connections while that one is still in its key exchange. It then costs the
attacker a sustained connection rate, not held fds, and the key holder gets in once it stops.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

# 64 waiting connections are far more than one key holder's handful of sessions ever needs at
# once, and with the listen backlog (100) still leave most of a 1,024-fd agent to sessions.
MAX_UNAUTHENTICATED = 64
# A quarter of the total: one address can never fill it alone, and 16 still absorbs a burst
# of parallel `run`s from one laptop or one port-forward.
MAX_UNAUTHENTICATED_PER_SOURCE = 16


class Evictable(Protocol):
    def abort(self) -> None: ...


@dataclass
class _Waiting:
    source: str
    peer: str
    authenticating: bool = False


def source_of(host: str) -> str:
    """What the per-source cap counts: the address, or its /64 for IPv6 (one host's usual share)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Admission:
    def __init__(self, on_evict: Callable[[str, str, str], None], total: int = MAX_UNAUTHENTICATED,
                 per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE) -> None:
        self._on_evict = on_evict  # (source, peer, which cap)
        self._total, self._per_source = total, per_source
        self._waiting: dict[Evictable, _Waiting] = {}  # insertion order is arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, conn: Evictable, host: str, peer: str) -> None:
        source = source_of(host)
        mine = [c for c, w in self._waiting.items() if w.source == source]
        if len(mine) >= self._per_source:
            self._evict(self._least_advanced(mine), "per-source")
        if len(self._waiting) >= self._total:
            counts = Counter(w.source for w in self._waiting.values())
            most = max(counts.values())
            self._evict(self._least_advanced([c for c, w in self._waiting.items() if counts[w.source] == most]),
                        "total")
        self._waiting[conn] = _Waiting(source, peer)

    def authenticating(self, conn: Evictable) -> None:
        waiting = self._waiting.get(conn)
        if waiting:
            waiting.authenticating = True

    def leave(self, conn: Evictable) -> None:
        """Authenticated or gone: no longer counted."""
        self._waiting.pop(conn, None)

    def _least_advanced(self, conns: list[Evictable]) -> Evictable:
        """The oldest of those not yet authenticating, else the oldest (min() keeps the first of equals)."""
        return min(conns, key=lambda c: self._waiting[c].authenticating)

    def _evict(self, conn: Evictable, cap: str) -> None:
        waiting = self._waiting.pop(conn)
        self._on_evict(waiting.source, waiting.peer, cap)
        conn.abort()


class ThrottledLog:
    """Lines as they come, at most `burst` per `window` seconds; the rest become one summary.

    An attacker decides how often we refuse a key or evict a connection; the log must not
    grow at the attacker's pace.
    """

    def __init__(self, log: logging.Logger, level: int, summary: str, burst: int = 5, window: float = 5.0) -> None:
        self._log, self._level, self._summary = log, level, summary
        self._burst, self._window = burst, window
        self._logged = 0
        self._held: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, source: str, msg: str, *args: object) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self._end_window)
            self._logged = 0
        if self._logged < self._burst:
            self._logged += 1
            self._log.log(self._level, msg, *args)
        else:
            self._held[source] += 1

    def _end_window(self) -> None:
        self._timer = None
        if self._held:
            top = ", ".join(f"{source}: {n}" for source, n in self._held.most_common(5))
            more = " ..." if len(self._held) > 5 else ""
            self._log.log(self._level, "%s: %d more in the last %g s (%s%s)", self._summary,
                          sum(self._held.values()), self._window, top, more)
            self._held.clear()
