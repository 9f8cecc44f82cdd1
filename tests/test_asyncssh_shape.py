"""sshopts.skip_ignore_padding replaces asyncssh's private `send_packet` on each connection.

An asyncssh release that renamed it, changed its signature, or stopped routing the empty
MSG_IGNORE it sends ahead of every message through it would bring that cost back without
a word (every frame encrypted and sent twice). These tests fail instead; pyproject.toml
also keeps asyncssh below its next major release.
"""
from __future__ import annotations

import asyncio
import inspect

import asyncssh
import pytest
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

from mirrord_tun import sshopts

WRITES = 20
P = inspect.Parameter


@pytest.mark.parametrize("cls", [asyncssh.SSHClientConnection, asyncssh.SSHServerConnection])
def test_send_packet_keeps_its_shape(cls: type) -> None:
    sig = inspect.signature(cls.send_packet)
    assert [(p.name, p.kind) for p in sig.parameters.values()] == [
        ("self", P.POSITIONAL_OR_KEYWORD), ("pkttype", P.POSITIONAL_OR_KEYWORD),
        ("args", P.VAR_POSITIONAL), ("handler", P.KEYWORD_ONLY)]
    assert sig.parameters["handler"].default is None


def test_the_padding_is_the_message_we_drop() -> None:
    assert (MSG_IGNORE, String(b"")) == (sshopts._MSG_IGNORE, sshopts._EMPTY_STRING)


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: the test talks to itself over loopback


async def _drain(process: asyncssh.SSHServerProcess) -> None:
    await process.stdin.read()
    process.exit(0)


async def _packets_sent_for_writes(patched: bool) -> int:
    """Packets the client encrypts and sends for WRITES channel writes, on a real connection."""
    server = await asyncssh.listen("127.0.0.1", 0, server_factory=_Server, process_factory=_drain,
                                   server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                   **sshopts.common())
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect("127.0.0.1", port, username="test", known_hosts=None, client_keys=None,
                                    agent_path=None, config=None, **sshopts.common()) as conn:
            if patched:
                sshopts.skip_ignore_padding(conn)
            chan, _ = await conn.create_session(asyncssh.SSHClientSession)
            # _send_seq counts every packet sent; nothing else can run between these lines.
            before = conn._send_seq
            for _ in range(WRITES):
                chan.write("x")
            sent = conn._send_seq - before
            chan.write_eof()
            await chan.wait_closed()
            return sent
    finally:
        server.close()
        await server.wait_closed()


def test_the_patch_halves_the_packets_sent() -> None:
    unpatched = asyncio.run(asyncio.wait_for(_packets_sent_for_writes(False), 60))
    assert unpatched == 2 * WRITES, "asyncssh no longer pads each message: sshopts.skip_ignore_padding can go"
    assert asyncio.run(asyncio.wait_for(_packets_sent_for_writes(True), 60)) == WRITES
