"""The agent's SSH server: one authorized key, one subsystem, nothing else served."""
from __future__ import annotations

import asyncio
import logging
import signal

import asyncssh

from mirrord_tun import protocol, sshopts
from mirrord_tun.agent import dataplane
from mirrord_tun.agent.session import AgentSession
from mirrord_tun.agent.target import Target
from mirrord_tun.channel import FrameSession
from mirrord_tun.netns.namespace import NetNs

log = logging.getLogger("mirrord-ns.agent")


class _Channel(FrameSession):
    """Deny by default: only the mirrord-ns subsystem opens; no shell, exec or pty."""

    def __init__(self, agent: "Agent", peer: str) -> None:
        super().__init__()
        self._agent, self._peer = agent, peer

    def pty_requested(self, *_a: object) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != protocol.SUBSYSTEM:
            return False
        self.endpoint = AgentSession(self._agent, self, self._peer)
        return True


class _Server(asyncssh.SSHServer):
    def __init__(self, agent: "Agent") -> None:
        self._agent = agent
        self._peer = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        sshopts.skip_ignore_padding(conn)
        host, port = conn.get_extra_info("peername")[:2]
        self._peer = f"{host}:{port}"

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def session_requested(self) -> FrameSession:
        return _Channel(self._agent, self._peer)


class Agent:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.ns = NetNs.open(target.netns_path)
        self.sessions: set[AgentSession] = set()

    async def serve(self, host: str, port: int, key: asyncssh.SSHKey, authorized: asyncssh.SSHAuthorizedKeys,
                    idle_exit: float | None = None) -> None:
        removed = await self.ns.acall(dataplane.remove_leftovers)
        if removed:
            log.warning("removed leftovers of a crashed agent: %s", " ".join(removed))
        server = await asyncssh.create_server(
            lambda: _Server(self), host, port,
            server_host_keys=[key], authorized_client_keys=authorized,
            agent_forwarding=False, x11_forwarding=False, allow_pty=False,
            allow_scp=False, line_editor=False, encoding=None,
            window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE, **sshopts.common(),
        )
        bound = server.sockets[0].getsockname()
        # The one line a launcher reads from the log to pin this agent's host key.
        print(f"mirrord-ns agent listening on {bound[0]}:{bound[1]} netns {self.target.netns_path} "
              f"host-key {key.export_public_key('openssh').decode().strip()} "
              f"({key.get_fingerprint('sha256')})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        idle = asyncio.create_task(self._exit_when_idle(idle_exit, stop)) if idle_exit else None
        try:
            await stop.wait()
        finally:
            if idle:
                idle.cancel()
            server.close()
            for session in list(self.sessions):
                session.close()
            for _ in range(50):  # teardown runs in tasks; give them up to 5 s
                if not self.sessions:
                    break
                await asyncio.sleep(0.1)
            self.ns.close()

    async def _exit_when_idle(self, seconds: float, stop: asyncio.Event) -> None:
        """A launched agent must not outlive its client: stop after `seconds` without a session (or never one)."""
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            await asyncio.sleep(min(1.0, seconds))
            if self.sessions:
                idle_since = loop.time()
            elif loop.time() - idle_since >= seconds:
                log.info("no session for %g s; exiting", seconds)
                stop.set()
                return
