"""SSH settings both ends agree on: fast AEAD ciphers, no compression, a short keepalive."""
from __future__ import annotations

from typing import Any

import asyncssh

# AES-GCM is hardware-accelerated almost everywhere; compression costs more CPU than a LAN saves.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT_MAX = 2  # a silent peer is declared dead after about 15 s
# Before authentication a peer holds an fd for this long at most (asyncssh's default is 120 s).
# A key holder logs in within a few round trips, and our client gives up after 10 s anyway.
LOGIN_TIMEOUT = 10
WINDOW = 8 * 1024 * 1024
MAX_PKTSIZE = 256 * 1024


def common() -> dict[str, Any]:
    return dict(
        encryption_algs=CIPHERS,
        compression_algs=["none"],
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
    )


_MSG_IGNORE = 2  # RFC 4253
_EMPTY_STRING = b"\0\0\0\0"  # an SSH string of length 0


def skip_ignore_padding(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> None:
    """Stop asyncssh from sending an empty MSG_IGNORE ahead of every message.

    asyncssh does that once encryption is on, a defence for CBC ciphers whose next IV
    could be predicted. Both ends here offer only the AEAD ciphers in CIPHERS, where it
    protects nothing, and it doubled the cost of every frame: two encryptions, two
    send()s, and often two wake-ups of the peer (SSH echo round trip 100 -> 60 us).
    """
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: object = None) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        send(pkttype, *args, handler=handler)  # type: ignore[arg-type]

    conn.send_packet = send_packet  # type: ignore[method-assign]
