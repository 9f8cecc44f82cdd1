"""A steal proxy worker: a process of its own serving a filtered port's requests that go to the pod.

    python -m mirrord_tun.agent.steal.worker AGENT_PID CONTROL_FD NETNS_FD   (the agent starts it)

Owns: the connections its listeners accept, as long as their requests go to the pod's server
(http1.HttpProxy, the same caps, framing checks and SO_ORIGINAL_DST check as the agent's).
May touch: its listeners (passed by the agent), transparent sockets to the pod (made in the
pod's namespace, which it enters first), and its control socket; never the laptop, never
nft. At the first request a session's filter takes, at HTTP/2 (prior knowledge), or at an
`Upgrade: h2c` request (each at a request boundary, nothing in flight) it hands the
connection back to the agent (workers.py) with the bytes it read and did not forward.
It dies with the agent (PR_SET_PDEATHSIG) and when its control socket ends.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import socket
import sys

from mirrord_tun.agent.steal import handoff
from mirrord_tun.agent.steal.http1 import CLOSED, Chooser, HttpProxy, Opener, RequestHead, request_head
from mirrord_tun.agent.steal.proxy import PortProxy, Route
from mirrord_tun.agent.steal.sockets import Connector, new_sockets
from mirrord_tun.agent.steal import framing
from mirrord_tun.netns.namespace import CLONE_NEWNET, setns

PR_SET_PDEATHSIG = 1
# A hand-over waits this long for room in the agent's queue (a burst of them fills it): the
# agent reads it on its event loop, so only a stuck agent takes longer.
HAND_OVER_WAIT = 5.0


def _pod_only(_head: RequestHead) -> Opener | None:
    return None


class HandingProxy(HttpProxy):
    """A client connection in a worker: requests to the pod served here, the rest handed over."""

    wanted: Chooser  # the port's own chooser: not None when a session's filter takes the request

    def __init__(self, port: "WorkerPort") -> None:
        super().__init__(port._setup, port._counters, port._closed)
        self.port = port

    def _route(self, head: framing.Head, whole: bytes | None = None) -> None:
        if self.wanted(request_head(head)) is not None or _asks_h2c(head):
            return self._hand_over(whole if whole is not None else bytes(self.buf))
        super()._route(head, whole)

    def _http2(self) -> None:
        self._hand_over(bytes(self.buf))

    def _hand_over(self, data: bytes) -> None:
        self.state = CLOSED
        try:
            handoff.send_adopt(self.port.control, self.port.listen_port, self.transport.get_extra_info("socket").fileno(),
                               data, HAND_OVER_WAIT)
            self.counters["steal_handed_over"] += 1
        except OSError as e:  # the agent is gone or stuck: the client sees its connection end
            print(f"mirrord-ns steal worker: cannot hand a connection over: {e}", file=sys.stderr, flush=True)
        self.transport.abort()  # our fd only: the agent holds the connection now


class WorkerPort(PortProxy):
    """One filtered port as a worker serves it: no opener to a session, a hand-over instead."""

    control: socket.socket

    def connection(self, first: bytes = b"") -> HttpProxy:
        return HandingProxy(self)

    def _chooser(self, conn: HttpProxy, peer: tuple[str, int]) -> Chooser:
        assert isinstance(conn, HandingProxy)
        conn.wanted = super()._chooser(conn, peer)
        return _pod_only


def _asks_h2c(head: framing.Head) -> bool:
    return any(name.lower() == "upgrade" and "h2c" in value.lower() for name, value in head.headers)


class Worker:
    """The control socket's messages: ports to serve, their filters, their end."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.ports: dict[int, WorkerPort] = {}
        self.counters: collections.Counter = collections.Counter()

        async def make(n: int, family: socket.AddressFamily) -> list[socket.socket]:
            return new_sockets(n, family)  # this whole process is in the pod's namespace
        self.connector = Connector(make)
        self.done = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[tuple[dict, list[int]]] = asyncio.Queue()  # in order: LISTEN before its ROUTES

    async def run(self) -> None:
        while True:
            header, fds = await self.inbox.get()
            try:
                await self.on_message(header, fds)
            except (KeyError, TypeError, ValueError, OSError) as e:
                print(f"mirrord-ns steal worker: bad message from the agent: {e}", file=sys.stderr)
                for fd in fds:
                    socket.close(fd)

    async def on_message(self, header: dict, fds: list[int]) -> None:
        op, port = header["op"], int(header["port"])
        if op == handoff.LISTEN:
            await self._listen(port, int(header["pod_port"]), fds)
        elif op == handoff.ROUTES and port in self.ports:
            self.ports[port].routes = [
                Route("", handoff.filter_from_wire(r["filter"]), {int(f): "" for f in r["families"]}, 0)
                for r in header["routes"]]
        elif op == handoff.CLOSE and port in self.ports:
            proxy = self.ports[port]
            proxy.closed = True
            for server in proxy.servers:
                server.close()
            proxy.check_idle()

    async def _listen(self, port: int, pod_port: int, fds: list[int]) -> None:
        holder: list[WorkerPort] = []
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(lambda: holder[0].connection(), sock=socket.socket(fileno=fd))
                   for fd in fds]
        proxy = WorkerPort(pod_port, servers, port, self.connector.connect, self.counters, self._drained)
        proxy.control = self.control
        holder.append(proxy)
        self.ports[port] = proxy

    def _drained(self, proxy: PortProxy) -> None:
        self.ports.pop(proxy.listen_port, None)
        handoff.send(self.control, {"op": handoff.DRAINED, "port": proxy.listen_port}, wait=HAND_OVER_WAIT)

    def readable(self) -> None:
        try:
            got = handoff.receive(self.control)
        except BlockingIOError:
            return
        except handoff.WireError:
            got = None
        if got is None:
            if not self.done.done():
                self.done.set_result(None)
            return
        header, _payload, fds = got
        self.inbox.put_nowait((header, fds))


async def serve(control: socket.socket) -> None:
    worker = Worker(control)
    loop = asyncio.get_running_loop()
    loop.add_reader(control.fileno(), worker.readable)
    runner = loop.create_task(worker.run())
    await worker.done
    runner.cancel()  # the agent closed its end (or died): our connections end with us


def _die_with(agent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent_pid:  # it died before the prctl: no signal will come
        os._exit(1)


def main() -> None:
    agent_pid, control_fd, ns_fd = map(int, sys.argv[1:4])
    _die_with(agent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the agent's to handle
    setns(ns_fd, CLONE_NEWNET)
    os.close(ns_fd)
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(control))
    else:
        uvloop.run(serve(control))


if __name__ == "__main__":
    main()
