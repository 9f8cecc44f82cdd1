"""Which pod ports to mirror, and onto which local port each one goes.

By default: every port the program serves in the local namespace, learned from
the kernel (sock_diag) every POLL_INTERVAL, so a program that starts listening
late is mirrored from then on; one that stops is dropped RESTART_HOLD later, so
that what arrives while the program restarts is still copied, and delivered
once it listens again. `--port P` adds a
port whether or not anything listens; `--port LOCAL:REMOTE` sends the pod's
REMOTE port to the local LOCAL port (and LOCAL, served locally, is then not
also mirrored from the pod's LOCAL port).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from mirrord_tun.netns import sockdiag
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import MAX_PORTS

log = logging.getLogger("mirrord-ns")
POLL_INTERVAL = 0.25
# Copies the agent captured before it applied our last SUBSCRIBE may still be on the way:
# ports just unsubscribed stay acceptable this long, so those are not counted as hostile.
RESUBSCRIBE_GRACE = 2.0
RESTART_HOLD = 30.0  # as long as delivery retries a refused connect


def parse_port(spec: str) -> tuple[int, int]:
    """`P` or `LOCAL:REMOTE` -> (remote, local)."""
    local, _, remote = spec.partition(":")
    try:
        ports = int(remote or local), int(local)
    except ValueError:
        raise ValueError(f"--port {spec!r}: expected PORT or LOCAL:REMOTE") from None
    if not all(0 < p < 65536 for p in ports):
        raise ValueError(f"--port {spec!r}: ports are 1-65535")
    return ports


def steal_ports(tcp: set[int], udp: set[int], mapping: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """What steal takes, per protocol (pod port -> local port), from the (TCP, UDP) ports the
    program serves and the --port `mapping`: a --port is stolen over TCP whether or not
    anything listens, over UDP once the program serves its local port over UDP."""
    mapped_locals = {local for remote, local in mapping.items() if local != remote}
    steal_tcp = {p: p for p in sorted(tcp - mapped_locals)} | mapping
    steal_udp = {p: p for p in sorted(udp - mapped_locals)} | {r: l for r, l in mapping.items() if l in udp}
    for ports in (steal_tcp, steal_udp):
        if len(ports) > MAX_PORTS:
            log.warning("the program serves %d ports; stealing the lowest %d", len(ports), MAX_PORTS)
            for p in sorted(ports)[MAX_PORTS:]:
                del ports[p]
    return steal_tcp, steal_udp


class PortWatcher:
    def __init__(self, ns: NetNs, pod_addrs: list[str], mapping: dict[int, int],
                 subscribe: Callable[[set[int]], None]) -> None:
        self._ns = ns
        self._pod_addrs = pod_addrs
        self._mapping = mapping  # remote -> local, from --port
        self._subscribe = subscribe
        self.ports: set[int] | None = None  # what the agent was last told
        self._previous: set[int] = set()
        self._previous_until = 0.0
        self._served: dict[int, float] = {}  # port -> when the program was last seen serving it

    def local_port(self, remote: int) -> int:
        return self._mapping.get(remote, remote)

    def subscribed(self, port: int, now: float) -> bool:
        """Whether copies for pod port `port` are ones we asked for (`now`: time.monotonic())."""
        if self.ports is not None and port in self.ports:
            return True
        return now < self._previous_until and port in self._previous

    async def run(self) -> None:
        mapped_locals = {local for remote, local in self._mapping.items() if local != remote}
        probe = await sockdiag.Probe.open(self._ns)
        try:
            while True:
                self._poll(probe, mapped_locals)
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            probe.close()

    def _poll(self, probe: sockdiag.Probe, mapped_locals: set[int]) -> None:
        tcp, udp = probe.serving_ports(self._pod_addrs)
        now = time.monotonic()
        self._served.update(dict.fromkeys(tcp | udp, now))
        self._served = {p: t for p, t in self._served.items() if now - t < RESTART_HOLD}
        ports = (set(self._served) - mapped_locals) | set(self._mapping)
        if len(ports) > MAX_PORTS:
            log.warning("the program serves %d ports; mirroring the lowest %d", len(ports), MAX_PORTS)
            ports = set(sorted(ports)[:MAX_PORTS])
        if ports != self.ports:
            log.info("mirroring pod ports: %s", ",".join(map(str, sorted(ports))) or "none")
            self._subscribe(ports)
            self._previous, self._previous_until = self.ports or set(), time.monotonic() + RESUBSCRIBE_GRACE
            self.ports = ports
