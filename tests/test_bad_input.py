"""Hostile or broken input to the agent after authentication.

A hand-driven client (the real SSH transport and framing from mirrord_tun.connect and
mirrord_tun.channel, frames chosen by the test) runs in the laptop namespace: its
event loop lives on a thread that joined that namespace, so its socket is opened
there, exactly like `mirrord-ns run`'s. The agent must drop and count every bad
frame or packet and keep serving the session.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import asyncssh
import dpkt
import pytest

from frames import QueuedEndpoint
from conftest import CLEAN_TIMEOUT, SVC, POD, Cluster, assert_clean, leftovers, wait_until
from mirrord_tun import protocol
from mirrord_tun.channel import FrameSession
from mirrord_tun.connect import open_channel
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.sandbox import Sandbox

T = TypeVar("T")
VNET = bytes(10)  # a plain virtio-net header: no checksum offload, no segmentation
FRAME_TIMEOUT = 10


class Probe(QueuedEndpoint):
    """One SSH connection with the mirrord-ns channel; frames go out raw and come back queued."""

    timeout = FRAME_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.session = FrameSession(self)
        self.conn: asyncssh.SSHClientConnection | None = None

    def on_closed(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    async def open(self, sb: Sandbox) -> "Probe":
        key = asyncssh.read_private_key(sb.keys.identity)
        pinned = asyncssh.read_public_key(sb.keys.host_pub)
        self.conn = await open_channel(sb.agent_address, key, pinned, self.session)
        return self

    async def close(self) -> None:
        if self.conn:
            self.conn.close()
            await self.conn.wait_closed()

    def send(self, data: bytes) -> None:
        self.session.write(data)

    async def hello(self) -> protocol.Welcome:
        self.send(protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION}))
        body = await self.expect(AgentMsg.WELCOME)
        return protocol.Welcome.from_json(protocol.parse_control(body))

    async def stats(self) -> dict[str, Any]:
        self.send(protocol.control(ClientMsg.STATS, {}))
        return protocol.parse_control(await self.expect(AgentMsg.STATS))

    async def ping(self, src: str, ident: int) -> None:
        """One ICMP echo through the tunnel, waiting for its reply in a PACKETS frame."""
        self.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets([echo_request(src, SVC, ident)])))
        await self.expect(AgentMsg.PACKETS, lambda body: any(
            is_echo_reply(p, SVC, src, ident) for p in protocol.unpack_packets(body)))


def in_laptop(sb: Sandbox, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run an async scenario on a thread inside the laptop namespace; every socket opens there."""
    ns = NetNs.open(sb.netns_path("laptop"))
    try:
        return ns.call(lambda: asyncio.run(asyncio.wait_for(scenario(), 60)))
    finally:
        ns.close()


def ipv4(src: str, dst: str, data: dpkt.Packet, proto: int) -> bytes:
    ip = dpkt.ip.IP(src=ipaddress.IPv4Address(src).packed, dst=ipaddress.IPv4Address(dst).packed,
                    p=proto, ttl=64, data=data)
    return bytes(ip)


def echo_request(src: str, dst: str, ident: int) -> bytes:
    icmp = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO,
                          data=dpkt.icmp.ICMP.Echo(id=ident, seq=1, data=b"mirrord-ns bad-input probe"))
    return VNET + ipv4(src, dst, icmp, dpkt.ip.IP_PROTO_ICMP)


def is_echo_reply(pkt: bytes, src: str, dst: str, ident: int) -> bool:
    try:
        ip = dpkt.ip.IP(pkt[len(VNET):])
    except dpkt.UnpackError:
        return False
    return (ip.p == dpkt.ip.IP_PROTO_ICMP and ip.src == ipaddress.IPv4Address(src).packed
            and ip.dst == ipaddress.IPv4Address(dst).packed and ip.data.type == dpkt.icmp.ICMP_ECHOREPLY
            and ip.data.data.id == ident)


def ipv6_packet() -> bytes:
    udp = dpkt.udp.UDP(sport=5000, dport=53, data=b"x")
    udp.ulen = len(bytes(udp))
    ip6 = dpkt.ip6.IP6(src=ipaddress.IPv6Address("fd00::2").packed, dst=ipaddress.IPv6Address("fd00::53").packed,
                       nxt=dpkt.ip.IP_PROTO_UDP, hlim=64, data=udp, plen=len(bytes(udp)))
    return VNET + bytes(ip6)


BAD_COUNTERS = ("dropped_frames_unexpected", "dropped_frames_malformed", "dropped_frames_oversized",
                "dropped_spoofed", "dropped_ipv6", "dropped_malformed")


def test_bad_frames_and_packets_are_dropped_counted_and_the_session_survives(cluster: Cluster) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], protocol.Welcome]:
        probe = await Probe().open(cluster.sb)
        try:
            welcome = await probe.hello()
            me = welcome.client_addr
            # Frames the agent cannot use: an unknown kind, an agent-side kind, a second HELLO.
            probe.send(protocol.frame(0x42, b"who knows"))
            probe.send(protocol.frame(AgentMsg.PACKETS, protocol.pack_packets([echo_request(me, SVC, 1)])))
            probe.send(protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION}))
            # PACKETS batches whose inner lengths lie: cut short, and running past the end.
            probe.send(protocol.frame(ClientMsg.PACKETS, b"\x00\x00"))
            probe.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets([echo_request(me, SVC, 2)])
                                      + b"\x00\x00\x10\x00" + b"short"))
            # A 2 MiB frame (MAX_BODY is 1 MiB): skipped whole; what follows must still parse.
            probe.send(protocol.frame(ClientMsg.PACKETS, b"\x00" * (2 << 20)))
            # Packets inside a valid batch: spoofed sources, IPv6, a runt.
            probe.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets([
                echo_request(POD, SVC, 3),  # the pod's own address
                echo_request(str(ipaddress.ip_address(me) + 4), SVC, 4),  # another session's block
                ipv6_packet(),
                VNET + b"\x45\x00\x00",
            ])))
            before = await probe.stats()
            await probe.ping(me, 0x4D52)  # the session still carries traffic
            after = await probe.stats()
            assert not probe.closed.done(), "the agent closed the session"
            return before, after, welcome
        finally:
            await probe.close()

    before, after, welcome = in_laptop(cluster.sb, scenario)
    assert ipaddress.ip_address(welcome.client_addr) in ipaddress.ip_network("100.64.0.0/10")
    assert {k: before.get(k, 0) for k in BAD_COUNTERS} == {
        "dropped_frames_unexpected": 3,
        "dropped_frames_malformed": 2,
        "dropped_frames_oversized": 1,
        "dropped_spoofed": 2,
        "dropped_ipv6": 1,
        "dropped_malformed": 1,
    }
    # None of the bad packets went out: the batches cut short are dropped whole.
    assert before.get("packets_in", 0) == 0
    assert after["packets_in"] >= 1 and after["packets_out"] >= 1
    assert {k: after.get(k, 0) for k in BAD_COUNTERS} == {k: before.get(k, 0) for k in BAD_COUNTERS}
    assert_clean(cluster.sb)


def test_frames_before_hello_are_counted_and_hello_still_works(cluster: Cluster) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        probe = await Probe().open(cluster.sb)
        try:
            probe.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets([VNET + b"\x45" + bytes(19)])))
            probe.send(protocol.frame(0x7F, b""))
            early = await probe.stats()
            welcome = await probe.hello()
            await probe.ping(welcome.client_addr, 0x4D53)
            return early, await probe.stats()
        finally:
            await probe.close()

    early, later = in_laptop(cluster.sb, scenario)
    assert early.get("dropped_frames_unexpected") == 2
    assert later["packets_in"] >= 1
    assert_clean(cluster.sb)


@pytest.mark.parametrize("hello", [b"not json", b"[1]", b'{"version": 0}', b'{"version": "x"}'])
def test_bad_hello_gets_one_error_and_the_channel_closes(cluster: Cluster, hello: bytes) -> None:
    async def scenario() -> tuple[dict[str, Any], Exception | None]:
        probe = await Probe().open(cluster.sb)
        try:
            probe.send(protocol.frame(ClientMsg.HELLO, hello))
            error = protocol.parse_control(await probe.expect(AgentMsg.ERROR))
            return error, await asyncio.wait_for(probe.closed, FRAME_TIMEOUT)
        finally:
            await probe.close()

    error, _ = in_laptop(cluster.sb, scenario)
    assert isinstance(error.get("error"), str) and error["error"]
    assert_clean(cluster.sb)


def test_nothing_but_the_subsystem_is_served(cluster: Cluster) -> None:
    """An authorized key gets the mirrord-ns channel and nothing else: no exec, shell, sftp or forwarding."""
    async def scenario() -> list[str]:
        probe = await Probe().open(cluster.sb)
        conn = probe.conn
        assert conn is not None
        refused = []
        attempts: dict[str, Callable[[], Awaitable[object]]] = {
            "exec": lambda: conn.create_session(asyncssh.SSHClientSession, "id"),
            "shell": lambda: conn.create_session(asyncssh.SSHClientSession),
            "sftp": lambda: conn.create_session(asyncssh.SSHClientSession, subsystem="sftp"),
            "direct-tcpip": lambda: conn.open_connection(SVC, 80),
        }
        try:
            for name, attempt in attempts.items():
                try:
                    await asyncio.wait_for(attempt(), FRAME_TIMEOUT)
                except asyncssh.ChannelOpenError:
                    refused.append(name)
            # The connection and its one real channel are unharmed by the refusals.
            await probe.hello()
        finally:
            await probe.close()
        return refused

    assert in_laptop(cluster.sb, scenario) == ["exec", "shell", "sftp", "direct-tcpip"]
    assert_clean(cluster.sb)


def test_client_leaving_during_setup_leaves_nothing(fresh_cluster: Cluster) -> None:
    """HELLO and gone at once: the agent finishes building the session, then must take it down.

    The namespace is clean for a moment before a session is even built, so the test waits for
    the agent to say it closed all five before it looks."""
    sb = fresh_cluster.sb
    sb.stop(fresh_cluster.agent)
    log = Path(sb.dir) / "agent-setup.log"
    with open(log, "w") as f:
        fresh_cluster.agent = sb.start_agent(stderr=f)

    async def scenario() -> None:
        for _ in range(5):
            probe = await Probe().open(sb)
            probe.send(protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION}))
            await probe.close()

    in_laptop(sb, scenario)
    assert wait_until(lambda: len(re.findall(r"session \S+ (closed|refused)", log.read_text())) == 5, CLEAN_TIMEOUT), \
        log.read_text()
    assert leftovers(sb) == []
