"""The agent's SSH server: one authorized key, one subsystem, nothing else served."""
from __future__ import annotations

import asyncio
import logging
import resource
import signal

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from mirrord_tun import protocol, sshfast, sshopts
from mirrord_tun.agent import dataplane, fileworkers, files, podwatch
from mirrord_tun.agent.admission import Admission, ThrottledLog, source_of
from mirrord_tun.agent.session import AgentSession
from mirrord_tun.agent.target import Target
from mirrord_tun.channel import FrameSession
from mirrord_tun.netns.namespace import NetNs

log = logging.getLogger("mirrord-ns.agent")
DEFAULT_RESUME_TIMEOUT = 60.0
RESOLVER_TIMEOUT = 5.0  # seconds a session's start waits for the container's resolv.conf


class _Channel(FrameSession):
    """Deny by default: only the mirrord-ns subsystem opens, and `sftp` (read-only, agent/files.py)
    when the agent works for a container (--pid); no shell, exec or pty."""

    def __init__(self, agent: "Agent", peer: str, key_fingerprint: str, workers: fileworkers.Workers) -> None:
        super().__init__()
        self._agent, self._peer, self._key, self._workers = agent, peer, key_fingerprint, workers
        # Set when this channel is the file service: asyncssh's stream session runs the SFTP
        # server, and every channel event goes to it.
        self._files: SSHServerStreamSession | None = None

    def pty_requested(self, *_a: object) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == files.SUBSYSTEM and self._agent.target.process and self.chan:
            self._files = files.session_for(self._agent.target.process, self._agent.files, self._workers)
            self._files.connection_made(self.chan)
            self.takes_memoryview = False  # asyncssh's SFTP server wants bytes
            return True
        if subsystem != protocol.SUBSYSTEM:
            return False
        self.endpoint = AgentSession(self._agent, self, self._peer, self._key)
        return True

    def session_started(self) -> None:
        if self._files:
            self._files.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._files:
            self._files.data_received(data, datatype)
        else:  # per message on the packet path: the base class named, cheaper than super()
            FrameSession.data_received(self, data, datatype)

    def eof_received(self) -> bool:
        return self._files.eof_received() if self._files else super().eof_received()

    def pause_writing(self) -> None:
        if self._files:
            self._files.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._files:
            self._files.resume_writing()
        else:
            super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._files:
            self._files.connection_lost(exc)
        else:
            super().connection_lost(exc)


class _KeyOf:
    """The authorized keys as asyncssh checks them, noting the last key that passed: the one a
    connection authenticated with (asyncssh checks the signed attempt last), which binds its sessions."""

    def __init__(self, authorized: asyncssh.SSHAuthorizedKeys) -> None:
        self._authorized = authorized
        self.fingerprint = ""

    def validate(self, key: asyncssh.SSHKey, *args: object, **kwargs: object) -> object:
        options = self._authorized.validate(key, *args, **kwargs)
        if options is not None:
            self.fingerprint = key.get_fingerprint("sha256")
        return options


class _Server(asyncssh.SSHServer):
    def __init__(self, agent: "Agent") -> None:
        self._agent = agent
        self._conn: asyncssh.SSHServerConnection | None = None
        self._host, self._peer = "?", "?"
        self._keys = _KeyOf(agent.authorized)
        # This connection's file threads: its hung mount waits here, never in another's.
        self._workers = fileworkers.Workers(agent.files.timeout)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        sshopts.skip_ignore_padding(conn)
        sshfast.Receiver(conn)
        self._conn = conn
        # A peer that reset right after the accept has no name any more; it is still counted.
        host, port = (conn.get_extra_info("peername") or ("?", 0))[:2]
        self._host, self._peer = host, f"{host}:{port}"
        self._agent.admission.admit(conn, host, self._peer)

    def begin_auth(self, username: str) -> bool:
        if self._conn:
            self._agent.admission.authenticating(self._conn)
            self._conn.set_authorized_keys(self._keys)  # type: ignore[arg-type]
        return True

    def auth_completed(self) -> None:
        if self._conn:
            self._agent.admission.leave(self._conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._workers.close()
        if self._conn:
            self._agent.admission.leave(self._conn)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Reached only for keys that are not the authorized one: say which, never more than its hash."""
        self._agent.refused_keys(source_of(self._host), "refused key %s from %s",
                                 key.get_fingerprint("sha256"), self._peer)
        return False

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def session_requested(self) -> FrameSession:
        return _Channel(self._agent, self._peer, self._keys.fingerprint, self._workers)


class Agent:
    def __init__(self, target: Target, resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
                 ipv6_forwarding: str = "auto", files_policy: files.Policy = files.Policy()) -> None:
        self.target = target
        self.files = files_policy  # what `run --mount`'s file service may ask (agent/files.py)
        # The container's resolv.conf, read at each session's start: shared, small, quick to give up.
        self.resolver_workers = fileworkers.Workers(min(RESOLVER_TIMEOUT, files_policy.timeout), threads=2, waiting=8)
        self.resume_timeout = resume_timeout  # how long a session whose connection dropped is kept
        self.ipv6_forwarding = ipv6_forwarding  # how sessions switch IPv6 forwarding on (netns.ipv6)
        self.resume_refused = 0
        self.authorized = asyncssh.SSHAuthorizedKeys()
        self.ns = NetNs.open(target.netns_path)
        self.sessions: set[AgentSession] = set()
        self.refused_keys = ThrottledLog(log, logging.WARNING, "refused keys")
        evictions = ThrottledLog(log, logging.INFO, "evicted unauthenticated connections")
        self.admission = Admission(lambda source, peer, cap: evictions(
            source, "evicted unauthenticated connection from %s (%s cap)", peer, cap))

    async def serve(self, host: str, port: int, key: asyncssh.SSHKey, authorized: asyncssh.SSHAuthorizedKeys,
                    idle_exit: float | None = None) -> None:
        _raise_fd_limit()
        self.authorized = authorized
        removed = await self.ns.acall(dataplane.remove_leftovers)
        if removed:
            log.warning("removed leftovers of a crashed agent: %s", " ".join(removed))
        server = await asyncssh.create_server(
            lambda: _Server(self), host, port,
            server_host_keys=[key], authorized_client_keys=authorized,
            agent_forwarding=False, x11_forwarding=False, allow_pty=False,
            allow_scp=False, line_editor=False, encoding=None,
            login_timeout=sshopts.LOGIN_TIMEOUT,
            window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE, **sshopts.common(),
        )
        bound = server.sockets[0].getsockname()
        # The one line a launcher reads from the log to pin this agent's host key.
        print(f"mirrord-ns agent listening on {bound[0]}:{bound[1]} netns {self.target.label} "
              f"host-key {key.export_public_key('openssh').decode().strip()} "
              f"({key.get_fingerprint('sha256')})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        idle = asyncio.create_task(self._exit_when_idle(idle_exit, stop)) if idle_exit else None
        pod_gone = asyncio.create_task(podwatch.wait_until_gone(self.ns))
        pod_gone.add_done_callback(lambda _: stop.set())
        try:
            await stop.wait()
        finally:
            if idle:
                idle.cancel()
            pod_gone.cancel()
            server.close()
            why = podwatch.POD_GONE if pod_gone.done() and not pod_gone.cancelled() else None
            for session in list(self.sessions):
                session.close(why)
            for _ in range(50):  # teardown runs in tasks; give them up to 5 s
                if not self.sessions:
                    break
                await asyncio.sleep(0.1)
            self.ns.close()

    async def _exit_when_idle(self, seconds: float, stop: asyncio.Event) -> None:
        """A launched agent must not outlive its client: stop after `seconds` without a session (or never one).
        A detached session counts until its grace period ends: its client may still come back."""
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


def _raise_fd_limit() -> None:
    """Soft NOFILE up to the hard limit (1,024 is a common soft default): the admission caps
    bound what strangers hold, the rest is for sessions.

    Should fds still run out, libuv (under uvloop, which the CLI runs us on) keeps a spare fd
    to accept and close pending connections with: an EMFILE neither spins the loop nor stops
    the server (tests/test_security_flood.py).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.debug("fd limit stays %d: %s", soft, e)
        return
    log.debug("fd limit raised from %d to %d", soft, hard)
