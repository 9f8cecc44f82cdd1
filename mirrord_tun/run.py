"""`mirrord-ns run` (and `attach`): the local end of a session, told in five steps.

1. The link (link.py) connects to the agent over SSH, says HELLO and gets WELCOME: the
   session's tunnel address, the pod's addresses and resolver, and (v4) how long the agent
   keeps the session when the connection drops.
2. Mounts (mounts.py), if asked for, are checked in the container and their channels opened
   before anything changes here, so a missing PATH costs one line and nothing else.
3. The tunnel (tunnel.py) opens the namespace (`run`: a fresh one; `attach`: a container's),
   makes the TUN there with the tunnel address, steers the namespace's traffic into it, and
   pumps packets between TUN and link.
4. Inbound traffic: steal (stealer.py) takes the pod's connections to the program's ports,
   or the mirror (mirror/feature.py) gives the program copies of them.
5. The caller uses the namespace (`run`: the command, command.py; `attach`: until a signal)
   while reconnect.py keeps the session up across dropped connections; then every feature
   is stopped in reverse order and the link closes, saying both ends' counters.

Each of 2-4 is a `Feature` (feature.py) the link dispatches frames to and tells of flow
control, loss and resume: a new feature is a new class and one `start` line here.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Awaitable, Callable

import asyncssh

from mirrord_tun import native, protocol, timing
from mirrord_tun.command import Command
from mirrord_tun.connect import printable
from mirrord_tun.feature import Feature
from mirrord_tun.link import AgentLink
from mirrord_tun.mirror.delivery import SPILL_LIMIT
from mirrord_tun.mirror.feature import mirror_feature
from mirrord_tun.netns import links
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.progress import QUIET
from mirrord_tun.reconnect import keep_up
from mirrord_tun.tunnel import Steer, Tunnel

if TYPE_CHECKING:  # imported where used: `run -- true` pays for neither
    from mirrord_tun.mounts import Mounts
    from mirrord_tun.stealer import StealOptions

log = logging.getLogger("mirrord-ns")


class LocalSession:
    # --mount: the container's directories in the command's mount namespace (set by the caller).
    mounts: Mounts | None = None

    def __init__(self, argv: list[str], agent: str, key: asyncssh.SSHKey, pinned: asyncssh.SSHKey,
                 sock: socket.socket | None = None, env: dict[str, str] | None = None,
                 mirror_ports: dict[int, int] | None = None, steal: StealOptions | None = None,
                 spill_limit: int = SPILL_LIMIT) -> None:
        self.argv = argv
        self.progress = QUIET  # `run --target`'s status line, closed before the command starts
        self.steal = steal  # replaces the mirror (give mirror_ports=None with it)
        # Inbound mirror: pod port -> local port given with --port (learned ports come on top);
        # None turns the mirror off. Its routing (mirror/delivery.py) is undone when it stops.
        self.mirror_ports = mirror_ports
        self.spill_limit = spill_limit  # bytes the program may fall behind the mirror, on disk
        # Pod addresses not to make local in the namespace: `attach` puts the agent's there
        # when our own SSH connection to it lives in that namespace.
        self.mirror_exclude: set[str] = set()
        self.env = env or {}  # on top of ours for the command: the target container's environment
        self.agent_ip: str | None = None  # the agent's IP as connected (None over a port-forward socket)
        self.link = AgentLink(agent, key, pinned, sock)

    @property
    def new_sock(self) -> Callable[[], socket.socket] | None:
        """A fresh socket to the agent for each reconnect (a new port-forward); None: dial it again."""
        return self.link.new_sock

    @new_sock.setter
    def new_sock(self, make: Callable[[], socket.socket] | None) -> None:
        self.link.new_sock = make

    async def run(self) -> int:
        """`run`: a fresh namespace whose default route is the tunnel, CMD in it."""
        command = Command(self.argv, self.env, self.mounts, self.until_lost)

        async def use(ns: NetNs, welcome: protocol.Welcome) -> int:
            self.progress.close()  # the terminal is the command's from here
            return await command.run_in(ns, welcome)
        return await self.serve(NetNs.new, links.make_default_via, use)

    async def serve(self, open_ns: Callable[[], NetNs], steer: Steer,
                    use: Callable[[NetNs, protocol.Welcome], Awaitable[int]]) -> int:
        """The five steps (see the top of this file) in the namespace `open_ns` gives.

        `steer(tun_name)` runs inside the namespace once the TUN has its address and
        routes traffic into it; it may return an undo (also run there, after the TUN
        is gone) for what does not vanish with the TUN. `run` and `attach` differ
        only in these three.
        """
        link = self.link
        self.progress.step("connecting to the agent…")
        await link.connect()  # 1
        timing.mark("SSH connected")
        self.progress.step("connected; opening the tunnel…")
        welcome = await link.hello()
        timing.mark("WELCOME received")
        self._announce(welcome)
        try:
            if self.mounts:  # 2
                from mirrord_tun.mounts import MountsFeature

                await link.features.start(MountsFeature(self.mounts, lambda: link.conn))
            tunnel = Tunnel(open_ns, steer, welcome, link, link.counters)
            await link.features.start(tunnel)  # 3
            timing.mark("tunnel up")
            assert tunnel.ns is not None
            inbound = self._inbound(tunnel.ns, welcome)
            if inbound is not None:
                await link.features.start(inbound)  # 4
                timing.mark("inbound up")
            return await use(tunnel.ns, welcome)  # 5
        finally:
            await link.close()
            timing.mark("session closed")

    async def until_lost(self, *others: asyncio.Future[object]) -> str | None:
        """Keep the tunnel up until one of `others` is done (None), resuming the session after a
        dropped connection; the one line to say (without our prefix) once it is lost for good."""
        return await keep_up(self.link, *others)

    def _announce(self, welcome: protocol.Welcome) -> None:
        conn = self.link.conn
        peer = conn.get_extra_info("peername") if conn else None
        # Where our SSH packets go: `attach` keeps this address off the tunnel.
        self.agent_ip = peer[0] if isinstance(peer, tuple) and peer else None
        log.info("session %s: tunnel address %s, pod %s, mtu %d, packet path in %s", welcome.session,
                 ",".join(welcome.client_addrs), ",".join(welcome.pod_addrs + welcome.pod_addrs6) or "?",
                 welcome.mtu, native.describe())
        if welcome.ipv6_off:
            log.warning("the pod has IPv6, but this session is IPv4 only: %s", printable(welcome.ipv6_off))

    def _inbound(self, ns: NetNs, welcome: protocol.Welcome) -> Feature | None:
        """Steal, or the mirror, or (neither asked for or possible) nothing."""
        link = self.link
        if self.steal is not None:
            from mirrord_tun.stealer import Stealer

            self.steal.check_agent(welcome.version)
            return Stealer(ns, welcome.client_addrs, self.steal, link.write, link.counters, lambda: link.up)
        if self.mirror_ports is None:
            return None
        return mirror_feature(ns, welcome, self.mirror_ports, self.mirror_exclude, link.write, link.counters,
                              self.spill_limit)
