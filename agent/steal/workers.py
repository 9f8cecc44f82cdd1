"""Filtered steal on several processes: the agent's side of its proxy workers (worker.py).

Owns: starting the workers, telling them each pod port's listening sockets and filters
(handoff.py's messages), taking back the connections they hand over, and noticing a
worker's death. May touch: the workers' processes and socketpairs; nothing of the kernel's.

Every filtered port has one listening socket per process on one port (SO_REUSEPORT: the
kernel spreads new connections over them); the agent keeps one and passes the others to
the workers. A worker serves the requests that go to the pod itself; at the first request
a session's filter takes (or HTTP/2, or an h2c upgrade) it hands the whole connection, with
the bytes it read and did not forward, back to the agent, which serves it from there as
if it had accepted it (http1.HttpProxy's `first`). A worker never talks to the laptop.

Workers are fresh interpreters (never a fork of this asyncio process), started in the pod's
network namespace (they get its fd and enter it first) and with no secret: no key, no
environment of ours (MIRRORD_NS_*). They die with the agent: PR_SET_PDEATHSIG, and the end of
their socketpair. A worker that dies is not replaced: the kernel resets the connections
waiting in its listeners' queues and spreads new ones over the sockets left, the agent's
always among them; `proxy_workers` counts the ones started.

The caps on connections per source and in total are the kernel's (conntrack counts in the
session's redirect, rules.declarations): they hold for the agent and its workers together.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from typing import Callable

from mirrord_tun.agent.steal import handoff
from mirrord_tun.agent.steal.filters import HttpFilter

log = logging.getLogger("mirrord-ns.agent")
MAX_AUTO = 4
SEND_WAIT = 1.0  # seconds a message to a worker may wait for room (only on a session's join or leave)
_configured: int | None = None  # None: auto_count()


def configure(count: int | None) -> None:
    """How many proxy workers every filtered port gets besides the agent (`agent
    --steal-proxy-workers`; None: auto_count())."""
    global _configured
    _configured = count


def auto_count() -> int:
    """0 on a node of two CPUs or fewer, where the pod's server, its clients and the proxy already
    share both and workers were measured to add CPU per request and no throughput
    (docs/benchmarks.md); else one per CPU the agent may use (its cgroup limit) past its own, at
    most MAX_AUTO, leaving two of the node's CPUs to the rest."""
    node = len(os.sched_getaffinity(0))
    if node <= 2:
        return 0
    return max(0, min(MAX_AUTO, _usable_cpus(node) - 1, node - 2))


def _usable_cpus(cpus: int) -> int:
    """`cpus`, or fewer if this cgroup's CPU limit says so."""
    for path, split in (("/sys/fs/cgroup/cpu.max", None), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "cpu.cfs_period_us")):
        try:
            with open(path) as f:
                fields = f.read().split()
            if split:  # cgroup v1: the period in a file of its own
                with open(os.path.join(os.path.dirname(path), split)) as f:
                    fields.append(f.read().strip())
            quota, period = fields[0], int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota not in ("max", "-1") and period > 0:
            return max(1, min(cpus, -(-int(quota) // period)))  # a limit of 1.5 CPUs: 2
    return cpus


Adopt = Callable[[int, socket.socket, bytes], None]  # listen port, the connection, bytes read of it


class _Worker:
    """One worker process and its socketpair."""

    def __init__(self, ns_fd: int, adopt: Adopt, drained: Callable[["_Worker", int], None],
                 gone: Callable[["_Worker"], None]) -> None:
        self._adopt, self._drained, self._gone = adopt, drained, gone
        self.ctl, theirs = handoff.pair()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_NS_")}
            # -P and cwd "/": a root process never imports from wherever the agent was started.
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "mirrord_tun.agent.steal.worker", str(os.getpid()),
                 str(theirs.fileno()), str(ns_fd)], pass_fds=(theirs.fileno(), ns_fd), env=env, cwd="/",
                stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.ctl.setblocking(False)
        self._adoptions = handoff.Adoptions()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.ctl.fileno(), self._readable)
        self.alive = True

    def send(self, header: dict, fds: tuple[int, ...] = ()) -> None:
        if not self.alive:
            return
        try:
            handoff.send(self.ctl, header, fds=fds, wait=SEND_WAIT)
        except OSError as e:  # its queue stayed full (it is stuck) or it is gone
            self.stop(f"cannot tell it: {e}")

    def _readable(self) -> None:
        while self.alive:
            try:
                got = handoff.receive(self.ctl)
                if got is None:
                    return self.stop("it ended")
                header, payload, fds = got
                if header["op"] == handoff.DRAINED and not fds:
                    self._drained(self, int(header["port"]))
                    continue
                done = self._adoptions.feed(header, payload, fds)
            except BlockingIOError:
                return
            except (handoff.WireError, KeyError, TypeError, ValueError) as e:
                return self.stop(f"bad message: {e}")
            if done is not None:
                port, fd, data = done
                self._adopt(port, socket.socket(fileno=fd), data)

    def stop(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log.warning("filtered steal: proxy worker %d stopped: %s", self.proc.pid, why)
        self.loop.remove_reader(self.ctl.fileno())
        self._adoptions.close()
        self.ctl.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)
        self._gone(self)


class WorkerPool:
    """The agent's proxy workers, started with the first filtered port, kept for its life."""

    def __init__(self, ns_fd: int, adopt: Adopt, drained: Callable[[int], None], count: int | None = None) -> None:
        self._ns_fd, self._adopt, self._drained = ns_fd, adopt, drained
        self._count = count if count is not None else _configured if _configured is not None else auto_count()
        self._workers: list[_Worker] = []
        self._started = False
        self._ports: dict[int, set[_Worker]] = {}  # listen port -> workers serving it
        self._closing: dict[int, set[_Worker]] = {}  # closed listen port -> workers still draining it

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for _ in range(self._count):
            try:
                self._workers.append(_Worker(self._ns_fd, self._adopt, self._on_drained, self._gone))
            except OSError as e:
                log.warning("filtered steal: no proxy worker: %s", e)
        if self._workers:
            log.info("filtered steal: %d proxy workers", len(self._workers))

    def live(self) -> int:
        return len(self._workers)

    def listen(self, listen_port: int, pod_port: int, groups: list[list[socket.socket]]) -> None:
        """Give each live worker one group of `listen_port`'s listeners; ours are closed here."""
        self._ports[listen_port] = set()
        for worker, group in zip(list(self._workers), groups):
            worker.send({"op": handoff.LISTEN, "port": listen_port, "pod_port": pod_port},
                        tuple(s.fileno() for s in group))
            if worker.alive:
                self._ports[listen_port].add(worker)
        for sock in (s for group in groups for s in group):
            sock.close()

    def routes(self, listen_port: int, routes: list[tuple[HttpFilter, list[int]]]) -> None:
        """The filters on `listen_port` now, each with the address families its session carries."""
        wire = [{"filter": handoff.filter_to_wire(f), "families": families} for f, families in routes]
        for worker in list(self._ports.get(listen_port, ())):
            worker.send({"op": handoff.ROUTES, "port": listen_port, "routes": wire})

    def close(self, listen_port: int) -> int:
        """Stop the workers accepting on `listen_port`; returns how many will say DRAINED."""
        serving = self._ports.pop(listen_port, set())
        for worker in list(serving):
            worker.send({"op": handoff.CLOSE, "port": listen_port})
        alive = {w for w in serving if w.alive}
        if alive:
            self._closing[listen_port] = alive
        return len(alive)

    def _on_drained(self, worker: _Worker, listen_port: int) -> None:
        closing = self._closing.get(listen_port, set())
        if worker in closing:
            closing.discard(worker)
            if not closing:
                del self._closing[listen_port]
            self._drained(listen_port)

    def _gone(self, worker: _Worker) -> None:
        self._workers = [w for w in self._workers if w is not worker]
        for serving in self._ports.values():
            serving.discard(worker)
        for port in [p for p, closing in self._closing.items() if worker in closing]:
            self._on_drained(worker, port)  # it never will: its connections died with it
