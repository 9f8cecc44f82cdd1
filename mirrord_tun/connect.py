"""Open the SSH connection and the protocol channel to an agent.

The agent's host key is pinned (never trust-on-first-use), our identity is a
single key, and every way this can fail becomes one `SetupError` line.
"""
from __future__ import annotations

import asyncio
import socket

import asyncssh

from mirrord_tun import protocol, sshfast, sshopts, timing
from mirrord_tun.channel import FrameSession
from mirrord_tun.progress import terminal_safe

CONNECT_TIMEOUT = 10


class SetupError(Exception):
    """Anything that stops a session before the command starts (exit 2)."""


class Gone(SetupError):
    """The session cannot come back (the agent refused it, or its pod was deleted): no retry."""


def printable(text: object, limit: int = 200) -> str:
    """Text the agent chose, for the terminal: no escape sequences, no second line, bounded."""
    if not isinstance(text, str) or not text:
        return "unknown error"
    return terminal_safe(text[:limit]).replace("\n", "?")


def parse_hostport(value: str, default_port: int = 2222) -> tuple[str, int]:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT; a bare IPv6 address (more than one colon) is a
    host without a port, as `ssh` reads it."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or rest and not rest.startswith(":"):
            raise SetupError(f"bad address {value!r}: expected [IPV6]:PORT")
        port = rest[1:] if rest else None
    elif value.count(":") > 1:
        host, port = value, None
    else:
        host, _sep, after = value.partition(":")
        port = after if _sep else None
    if port is None:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise SetupError(f"bad address {value!r}: expected HOST:PORT")
    return host, int(port)


def load_keys(identity: str, host_key: str) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """The identity and the pinned host key, read with the rights of the user behind sudo."""
    from mirrord_tun.kube.asuser import principal

    got = principal().read([identity, host_key])
    try:
        key = asyncssh.import_private_key(_content(got[identity]))
    except (OSError, asyncssh.KeyImportError) as e:
        raise SetupError(f"cannot read identity {identity}: {getattr(e, 'strerror', None) or e}") from None
    try:
        pinned = asyncssh.import_public_key(_content(got[host_key]))
    except (OSError, asyncssh.KeyImportError) as e:
        raise SetupError(f"cannot read agent host key {host_key}: {getattr(e, 'strerror', None) or e}") from None
    timing.mark("keys read")
    return key, pinned


def _content(got: bytes | OSError) -> bytes:
    if isinstance(got, OSError):
        raise got
    return got


async def open_channel(address: str, key: asyncssh.SSHKey, pinned: asyncssh.SSHKey,
                       session: FrameSession, sock: socket.socket | None = None
                       ) -> asyncssh.SSHClientConnection:
    """Connect (or run SSH over `sock`) and open the subsystem channel into `session`."""
    host, port = parse_hostport(address)
    try:
        conn = await asyncio.wait_for(asyncssh.connect(
            # With sock, host only names the peer: a port-forward's socketpair has no peername.
            host, port, sock=sock, username="mirrord",
            client_keys=[key], known_hosts=([pinned], [], []), agent_path=None,
            config=None, preferred_auth="publickey", **sshopts.common(),
        ), CONNECT_TIMEOUT)
    except asyncio.TimeoutError:
        raise SetupError(f"agent {address}: no answer within {CONNECT_TIMEOUT} s") from None
    except asyncssh.HostKeyNotVerifiable:
        raise SetupError(f"agent {address}: its host key is not the pinned one; refusing to connect") from None
    except asyncssh.PermissionDenied:
        raise SetupError(f"agent {address}: our identity key was refused") from None
    except (OSError, asyncssh.Error) as e:
        # asyncssh's errors may quote the agent's disconnect text.
        raise SetupError(f"agent {address}: {printable(getattr(e, 'strerror', None) or str(e))}") from None
    sshopts.skip_ignore_padding(conn)
    sshfast.Receiver(conn)
    try:
        await conn.create_session(lambda: session, subsystem=protocol.SUBSYSTEM, encoding=None,
                                  window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE)
    except asyncssh.Error as e:
        conn.close()
        raise SetupError(f"agent {address}: cannot open the mirrord-ns channel: {printable(str(e))}") from None
    return conn
