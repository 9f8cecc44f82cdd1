"""netns/sockdiag.py against the kernel: which ports a namespace serves, asked from the test's
own thread through a Probe made in a namespace of the test's own (the mirror and steal ask it
every 0.25 s). Sockets the namespace has are made there (private_ns.call)."""
from __future__ import annotations

import asyncio
import socket

from mirrord_tun.netns import sockdiag
from mirrord_tun.netns.namespace import NetNs

POD = "198.18.0.20"


def _bound(kind: int, family: int, addr: str, connect: tuple[str, int] | None = None) -> socket.socket:
    s = socket.socket(family, kind)
    s.bind((addr, 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    elif connect:
        s.connect(connect)
    return s


def test_what_would_receive_the_pods_traffic_is_served_and_nothing_else(private_ns: NetNs) -> None:
    tcp, udp, v6 = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.AF_INET6
    made = [
        ("tcp", True, private_ns.call(_bound, tcp, socket.AF_INET, "0.0.0.0")),
        ("tcp", True, private_ns.call(_bound, tcp, v6, "::")),
        ("tcp", False, private_ns.call(_bound, tcp, socket.AF_INET, "127.0.0.1")),  # never sees the pod's traffic
        ("udp", True, private_ns.call(_bound, udp, socket.AF_INET, "0.0.0.0")),
        ("udp", False, private_ns.call(_bound, udp, socket.AF_INET, "0.0.0.0", ("127.0.0.1", 53))),  # a client
    ]
    probe = asyncio.run(sockdiag.Probe.open(private_ns))
    try:
        for _ in range(3):  # the same socket, asked again, answers the same
            served_tcp, served_udp = probe.serving_ports([POD])
            for proto, served, s in made:
                port = s.getsockname()[1]
                assert (port in (served_tcp if proto == "tcp" else served_udp)) is served, (proto, s)
        # The probe lists the namespace it was made in, not the caller's: none of the ports of the
        # host's namespace (where this thread is) can appear, and the namespace has only ours.
        ours = {s.getsockname()[1] for proto, served, s in made if served}
        assert served_tcp | served_udp == ours
    finally:
        probe.close()
        for _, _, s in made:
            s.close()


def test_an_interrupted_dump_does_not_leak_into_the_next_answer(private_ns: NetNs) -> None:
    """A dump whose answer was never read (an exception mid-recv) is still queued on the socket:
    the next ask skips it by its sequence number instead of counting its sockets twice or
    taking its DONE for its own."""
    listener = private_ns.call(_bound, socket.SOCK_STREAM, socket.AF_INET, "0.0.0.0")
    probe = asyncio.run(sockdiag.Probe.open(private_ns))
    try:
        sent = sockdiag._REQ.pack(socket.AF_INET, socket.IPPROTO_UDP, 0, 1 << sockdiag.TCP_CLOSE)
        probe._sock.send(sockdiag._NLMSG.pack(sockdiag._NLMSG.size + len(sent), sockdiag.SOCK_DIAG_BY_FAMILY,
                                              sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP, 0xABCD, 0) + sent)
        assert probe.serving_ports([POD]) == ({listener.getsockname()[1]}, set())
    finally:
        probe.close()
        listener.close()
