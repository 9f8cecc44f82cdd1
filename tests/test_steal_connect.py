"""The steal proxy's upstream connect (agent/steal/sockets.py): a connect the kernel completes
inside the call (the pod's own server) skips the loop's wait; one that has to wait (the
tunnel's side, a server slow to answer) is waited for, and one that completes between the two
looks is done, not an error. In a namespace of the test's own; nothing leaves it."""
from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from mirrord_tun.agent.steal import sockets
from mirrord_tun.netns.namespace import NetNs


@pytest.fixture
def ns(private_ns: NetNs) -> NetNs:
    # 198.18.0.99 is routed into a TUN device nobody reads: a SYN there is never answered, so
    # its connect stays in progress.
    for argv in (["tuntap", "add", "mrdblack", "mode", "tun"], ["link", "set", "mrdblack", "up"],
                 ["addr", "add", "198.18.0.1/24", "dev", "mrdblack"]):
        private_ns.call(subprocess.check_call, ["ip", *argv])
    return private_ns


def test_a_connect_to_this_namespace_completes_in_the_call(ns: NetNs) -> None:
    listener = ns.call(socket.create_server, ("127.0.0.1", 0))
    sock = ns.call(sockets._stream, socket.AF_INET)
    try:
        assert sockets._connected_at_once(sock, listener.getsockname()) is True
        assert sock.getpeername() == listener.getsockname()
    finally:
        sock.close()
        listener.close()


def test_a_refused_connect_is_an_error_at_once(ns: NetNs) -> None:
    with ns.call(socket.create_server, ("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    sock = ns.call(sockets._stream, socket.AF_INET)
    try:
        with pytest.raises(ConnectionRefusedError):
            sockets._connected_at_once(sock, ("127.0.0.1", port))
    finally:
        sock.close()


def test_a_connect_that_waits_is_left_to_the_loop_and_times_out_there(ns: NetNs) -> None:
    sock = ns.call(sockets._stream, socket.AF_INET)

    async def wait() -> None:
        async with asyncio.timeout(0.3):
            await sockets._connect_done(asyncio.get_running_loop(), sock, ("198.18.0.99", 80))

    try:
        assert sockets._connected_at_once(sock, ("198.18.0.99", 80)) is False
        with pytest.raises(TimeoutError):
            asyncio.run(wait())
    finally:
        sock.close()


def test_a_connect_that_completed_between_the_looks_is_done(ns: NetNs) -> None:
    """The loop's sock_connect calls connect() again: EISCONN then means done."""
    listener = ns.call(socket.create_server, ("127.0.0.1", 0))
    sock = ns.call(sockets._stream, socket.AF_INET)
    try:
        sock.connect_ex(listener.getsockname())  # done inside the call, as to the pod's server
        asyncio.run(_done(sock, listener.getsockname()))
        assert sock.getpeername() == listener.getsockname()
    finally:
        sock.close()
        listener.close()


async def _done(sock: socket.socket, dest: tuple[str, int]) -> None:
    await sockets._connect_done(asyncio.get_running_loop(), sock, dest)
