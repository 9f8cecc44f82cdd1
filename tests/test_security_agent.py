"""A hostile agent, and a hostile client, against the real `mirrord-ns run` and agent.

The fake agent is a real asyncssh server in this process with freshly generated keys,
speaking the protocol (mirrord_tun.channel framing) with frames the test chooses. It
listens on 127.0.0.1 inside a namespace this test makes, and `mirrord-ns run` is
started in that namespace, pinned to its key: exactly the position of a compromised
agent pod. Whatever it sends, `run` must either refuse it in one line (exit 2, nothing
left behind) or drop and count it, and never let it steer the command's network.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import asyncssh
import dpkt
import pytest

from conftest import SVC, Cluster, assert_clean, local_dropped
from frames import QueuedEndpoint
from mirrord_tun import protocol, sshopts
from mirrord_tun.channel import FrameSession
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.command import RESOLV_DIR, RESOLV_PREFIX
from mirrord_tun.sandbox import Sandbox
from test_bad_input import Probe, echo_request, in_laptop

T = TypeVar("T")
CLIENT, AGENT, POD, CLIENT_HOST = "100.64.0.2", "100.64.0.1", "198.18.0.10", "198.18.0.30"
FRAME_TIMEOUT = 20
RUN_TIMEOUT = 60
GOOD_WELCOME: dict[str, Any] = {"version": protocol.VERSION, "session": "5ec0a6e1", "client_addr": CLIENT,
                                "agent_addr": AGENT, "mtu": 1500, "pod_addrs": [POD],
                                "resolv_conf": "nameserver 198.18.0.53\n", "secret": "5e" * 32,
                                "resume_timeout": 0}


# --- the fake agent

class FakeSession(QueuedEndpoint):
    """One client's channel: frames come in queued, STATS are answered (run -v asks at the end)."""

    timeout = FRAME_TIMEOUT

    def __init__(self, channel: FrameSession) -> None:
        super().__init__()
        self.channel = channel

    def on_frame(self, kind: int, body: bytes) -> None:
        if kind == ClientMsg.STATS:
            self.send(protocol.control(AgentMsg.STATS, {}))
        super().on_frame(kind, body)

    def on_closed(self, exc: Exception | None) -> None:
        pass

    def send(self, data: bytes) -> None:
        self.channel.write(data)


class _Channel(FrameSession):
    def __init__(self, sessions: asyncio.Queue[FakeSession]) -> None:
        super().__init__()
        self._sessions = sessions

    def subsystem_requested(self, subsystem: str) -> bool:
        self.endpoint = session = FakeSession(self)
        self._sessions.put_nowait(session)
        return subsystem == protocol.SUBSYSTEM


class _Server(asyncssh.SSHServer):
    def __init__(self, sessions: asyncio.Queue[FakeSession]) -> None:
        self._sessions = sessions

    def session_requested(self) -> FrameSession:
        return _Channel(self._sessions)


@contextlib.asynccontextmanager
async def fake_agent(sb: Sandbox) -> AsyncIterator[tuple[str, asyncio.Queue[FakeSession]]]:
    """An agent holding the sandbox's host key, trusting its identity; yields (address, sessions)."""
    sessions: asyncio.Queue[FakeSession] = asyncio.Queue()
    server = await asyncssh.create_server(
        lambda: _Server(sessions), "127.0.0.1", 0,
        server_host_keys=[sb.keys.host_key], authorized_client_keys=sb.keys.identity_pub,
        allow_pty=False, line_editor=False, encoding=None, **sshopts.common())
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", sessions
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    """Keys and one namespace ("laptop") holding the fake agent and `run`; nothing else is built."""
    sb = Sandbox()
    try:
        subprocess.run(["ip", "netns", "add", sb.ns("laptop")], check=True)
        sb.namespaces.append(sb.ns("laptop"))
        subprocess.run(["ip", "-n", sb.ns("laptop"), "link", "set", "lo", "up"], check=True)
        yield sb
    finally:
        sb.close()


def in_box(sb: Sandbox, scenario: Callable[[], Awaitable[T]]) -> T:
    """The scenario's loop on a thread inside the box: the fake agent listens there."""
    ns = NetNs.open(sb.netns_path("laptop"))
    try:
        return ns.call(lambda: asyncio.run(asyncio.wait_for(scenario(), 2 * RUN_TIMEOUT)))
    finally:
        ns.close()


async def run_against(sb: Sandbox, address: str, *args: str,
                      talk: Callable[[FakeSession, asyncio.subprocess.Process], Awaitable[None]],
                      sessions: asyncio.Queue[FakeSession]) -> tuple[int, str, str, int]:
    """`mirrord-ns run ARGS` against the fake agent while `talk` plays the agent; (rc, out, err, pid).

    `ip netns exec` execs, so the pid is run's own (it names run's resolver file).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-m", "mirrord_tun", "run", "--agent", address,
        "--identity", sb.keys.identity, "--agent-host-key", sb.keys.host_pub, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        session = await asyncio.wait_for(sessions.get(), FRAME_TIMEOUT)
        await session.expect(ClientMsg.HELLO)
        await talk(session, proc)
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode(), proc.pid
    finally:
        if proc.returncode is None:  # SIGTERM first: run then takes its namespace down
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def left_behind(sb: Sandbox, run_pid: int) -> list[str]:
    """Processes still in the box, and the resolver file of that run if it outlived it."""
    procs = subprocess.run(["ip", "netns", "pids", sb.ns("laptop")], capture_output=True, text=True).stdout.split()
    return [f"pid {p}" for p in procs] + glob.glob(os.path.join(RESOLV_DIR, f"{RESOLV_PREFIX}{run_pid}.*"))


# --- WELCOME: refused in one line

def welcome(**changes: Any) -> bytes:
    return json.dumps({**GOOD_WELCOME, **changes}).encode()


def nested(depth: int) -> bytes:
    return b'{"version":2,"pod_addrs":' + b"[" * depth + b"]" * depth + b"}"


BAD_WELCOMES = {
    "mtu too big": (welcome(mtu=70000), "mtu 70000 out of range 576-65535"),
    "mtu too small": (welcome(mtu=68), "mtu 68 out of range"),
    "mtu a string": (welcome(mtu="1500"), "mtu must be an integer"),
    "version a boolean": (welcome(version=True), "version must be an integer"),
    "version never offered": (welcome(version=protocol.VERSION + 1), "out of range"),
    "loopback tunnel address": (welcome(client_addr="127.0.0.1"), "client_addr 127.0.0.1 is not a unicast"),
    "garbage address": (welcome(agent_addr="100.64.0.1; flush ruleset"), "agent_addr is not an IPv4 address"),
    "multicast pod address": (welcome(pod_addrs=["224.0.0.1"]), "pod address 224.0.0.1 is not a unicast"),
    "pod address is ours": (welcome(pod_addrs=[CLIENT]), "a pod address is a tunnel address"),
    "nft injection in a pod address": (welcome(pod_addrs=["198.18.0.10 } ; flush ruleset ; {"]), "not an IPv4"),
    "pod_addrs a string": (welcome(pod_addrs=POD), "pod_addrs must be a list"),
    "terminal escapes in the session id": (welcome(session="\x1b]0;owned\x07"), "session is not a short hex id"),
    "huge resolv_conf": (welcome(resolv_conf="#" * 100_000), "resolv_conf of 100000 bytes"),
    "resolv_conf past the control limit": (welcome(resolv_conf="#" * 200_000), "control body of"),
    "resolv_conf no file can hold": (welcome(resolv_conf="\ud800"), "resolv_conf is not valid text"),
    "deep nesting": (nested(40_000), "nested too deeply"),
    "not json": (b"\xff\xfe{", "bad control body"),
    "not an object": (b"[1, 2]", "not an object"),
    "missing field": (json.dumps({k: v for k, v in GOOD_WELCOME.items() if k != "mtu"}).encode(), "mtu missing"),
}


@pytest.mark.parametrize("case", list(BAD_WELCOMES))
def test_hostile_welcome_is_refused_in_one_line_and_leaves_nothing(box: Sandbox, case: str) -> None:
    body, expected = BAD_WELCOMES[case]

    async def scenario() -> tuple[int, str, str, int]:
        async def talk(session: FakeSession, _proc: asyncio.subprocess.Process) -> None:
            session.send(protocol.frame(AgentMsg.WELCOME, body))

        async with fake_agent(box) as (address, sessions):
            return await run_against(box, address, "--", "echo", "the command must not run",
                                     talk=talk, sessions=sessions)

    rc, out, err, pid = in_box(box, scenario)
    assert rc == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrord-ns: agent sent a bad WELCOME: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])
    assert left_behind(box, pid) == []


def test_hostile_error_message_reaches_the_terminal_defused(box: Sandbox) -> None:
    async def scenario() -> tuple[int, str, str, int]:
        async def talk(session: FakeSession, _proc: asyncio.subprocess.Process) -> None:
            session.send(protocol.control(AgentMsg.ERROR, {"error": "no\x1b[2J\nmirrord-ns: fake second line" + "x" * 5000}))

        async with fake_agent(box) as (address, sessions):
            return await run_against(box, address, "--", "true", talk=talk, sessions=sessions)

    rc, _out, err, pid = in_box(box, scenario)
    assert rc == 2
    lines = err.splitlines()
    assert lines[-1].startswith("mirrord-ns: agent refused the session: no?[2J?mirrord-ns: fake second line")
    assert "\x1b" not in err and len(lines[-1]) < 300 and "Traceback" not in err
    assert left_behind(box, pid) == []


# --- MIRROR: copies that would steer run's transparent sockets

TCP_PORT_LOCAL_ONLY = 7001  # the program listens on 127.0.0.1 only (TCP and UDP)
TCP_PORT_MAPPED = 7002  # 0.0.0.0, but --port 7002:7003 mirrors the pod's 7003 onto it instead
POD_PORT_MAPPED = 7003
TCP_PORT_LEARNED = 7005  # 0.0.0.0: subscribed once it listens (listened on last: "the program is ready")

PROGRAM = f"""
import select, socket, sys
local = socket.create_server(("127.0.0.1", {TCP_PORT_LOCAL_ONLY}))
local_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
local_udp.bind(("127.0.0.1", {TCP_PORT_LOCAL_ONLY}))
mapped = socket.create_server(("0.0.0.0", {TCP_PORT_MAPPED}))
learned = socket.create_server(("0.0.0.0", {TCP_PORT_LEARNED}))
while True:
    for s in select.select([local, local_udp, mapped, learned], [], [])[0]:
        if s is local_udp:
            data, peer = s.recvfrom(65535)
            print("udp", s.getsockname()[1], peer[0], data.decode(), flush=True)
            continue
        conn, peer = s.accept()
        conn.settimeout(20)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        print("tcp", s.getsockname()[1], peer[0], data.decode(), flush=True)
        if data == b"good":
            sys.exit(0)
"""


def ip_packet(src: str, dst: str, proto: int, l4: dpkt.Packet) -> bytes:
    return bytes(dpkt.ip.IP(src=ipaddress.IPv4Address(src).packed, dst=ipaddress.IPv4Address(dst).packed,
                            p=proto, ttl=64, data=l4))


def whole_connection(src: str, dst: str, dport: int, data: bytes, sport: int = 40001) -> bytes:
    """One copied segment that is a whole TCP conversation from the client: SYN, data, FIN."""
    seg = dpkt.tcp.TCP(sport=sport, dport=dport, seq=1000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_FIN, data=data)
    return ip_packet(src, dst, dpkt.ip.IP_PROTO_TCP, seg)


def datagram(src: str, dst: str, dport: int, data: bytes) -> bytes:
    udp = dpkt.udp.UDP(sport=40002, dport=dport, data=data)
    udp.ulen = len(bytes(udp))
    return ip_packet(src, dst, dpkt.ip.IP_PROTO_UDP, udp)


HOSTILE_COPIES = {
    "dropped_mirror_destination": [
        whole_connection(CLIENT_HOST, "127.0.0.1", TCP_PORT_LOCAL_ONLY, b"to a 127.0.0.1-only listener"),
        datagram(CLIENT_HOST, "127.0.0.1", TCP_PORT_LOCAL_ONLY, b"to a 127.0.0.1-only UDP socket"),
        whole_connection(CLIENT_HOST, "198.18.0.11", POD_PORT_MAPPED, b"to an address not the pod's"),
    ],
    "dropped_mirror_port": [
        whole_connection(CLIENT_HOST, POD, TCP_PORT_MAPPED, b"to a port never subscribed"),
        whole_connection(CLIENT_HOST, POD, TCP_PORT_LOCAL_ONLY, b"to another port never subscribed"),
    ],
    "dropped_mirror_source": [
        whole_connection("127.0.0.1", POD, POD_PORT_MAPPED, b"from loopback"),
        whole_connection("224.0.0.1", POD, POD_PORT_MAPPED, b"from multicast"),
        whole_connection("169.254.7.7", POD, POD_PORT_MAPPED, b"from link-local"),
        whole_connection("0.0.0.0", POD, POD_PORT_MAPPED, b"from nowhere"),
        whole_connection(CLIENT, POD, POD_PORT_MAPPED, b"from our tunnel address"),
        whole_connection(POD, POD, POD_PORT_MAPPED, b"from the pod's own address"),
        whole_connection(CLIENT_HOST, POD, POD_PORT_MAPPED, b"from port 0", sport=0),
    ],
    "dropped_mirror_protocol": [
        ip_packet(CLIENT_HOST, POD, dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=8, data=b"ping")),
    ],
    "dropped_mirror_malformed": [
        b"\x4f" + whole_connection(CLIENT_HOST, POD, POD_PORT_MAPPED, b"header longer than the packet")[1:40],
    ],
}


def test_hostile_mirror_copies_never_reach_the_program(box: Sandbox) -> None:
    async def scenario() -> tuple[int, str, str, int]:
        async def talk(session: FakeSession, _proc: asyncio.subprocess.Process) -> None:
            session.send(protocol.control(AgentMsg.WELCOME, GOOD_WELCOME))
            wanted = {POD_PORT_MAPPED, TCP_PORT_LEARNED}
            await session.expect(ClientMsg.SUBSCRIBE, lambda b: protocol.parse_subscribe(b) == wanted)
            hostile = [p for copies in HOSTILE_COPIES.values() for p in copies]
            session.send(protocol.frame(AgentMsg.MIRROR, protocol.pack_packets(hostile)))
            # Then one real client's connection to the mapped port: the program prints it and exits.
            session.send(protocol.frame(AgentMsg.MIRROR, protocol.pack_packets([
                whole_connection(CLIENT_HOST, POD, POD_PORT_MAPPED, b"good", sport=40010)])))

        async with fake_agent(box) as (address, sessions):
            return await run_against(box, address, "-v", "--port", f"{TCP_PORT_MAPPED}:{POD_PORT_MAPPED}",
                                     "--", sys.executable, "-c", PROGRAM, talk=talk, sessions=sessions)

    rc, out, err, pid = in_box(box, scenario)
    assert rc == 0, err
    # Only the real client's connection reached the program, on the mapped port, with its address.
    assert out.splitlines() == [f"tcp {TCP_PORT_MAPPED} {CLIENT_HOST} good"]
    counts = local_dropped(err)
    assert {k: counts.get(k, 0) for k in HOSTILE_COPIES} == {k: len(v) for k, v in HOSTILE_COPIES.items()}
    assert "Traceback" not in err
    assert left_behind(box, pid) == []


# --- PACKETS with hostile virtio-net headers, both ways

def vnet(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
         csum_offset: int = 0) -> bytes:
    return struct.pack("=BBHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset)


NEEDS_CSUM, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 1, 1, 3, 4


def tcp_packet(src: str, dst: str, size: int = 3000) -> bytes:
    return ip_packet(src, dst, dpkt.ip.IP_PROTO_TCP,
                     dpkt.tcp.TCP(sport=80, dport=40000, seq=1, flags=dpkt.tcp.TH_ACK, data=b"z" * size))


def hostile_vnet_packets(src: str, dst: str) -> list[bytes]:
    tcp, icmp = tcp_packet(src, dst), echo_request(src, dst, 7)[10:]
    return [
        vnet(NEEDS_CSUM, GSO_UDP, 40, 1400, 20, 16) + tcp,  # UDP segmentation of a TCP packet
        vnet(NEEDS_CSUM, GSO_TCPV6, 40, 1400, 20, 16) + tcp,  # IPv6 segmentation of IPv4
        vnet(NEEDS_CSUM, 0xFF, 40, 1400, 20, 16) + tcp,  # no such gso_type
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1, 20, 16) + tcp,  # 1-byte segments: 3000 packets from one
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16) + tcp,  # no segment size at all
        vnet(NEEDS_CSUM, GSO_TCPV4, 28, 1400, 20, 16) + icmp,  # TCP segmentation of ICMP
        vnet(0, GSO_TCPV4, 40, 1400, 20, 16) + tcp,  # GSO without a checksum to finish
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 6) + tcp,  # the checksum aimed into the TCP header
        vnet(NEEDS_CSUM, 0, 0, 0, 60000, 16) + icmp,  # checksum start past the end
        vnet(NEEDS_CSUM, 0, 0, 0, 20, 65000) + icmp,  # checksum offset past the end
        vnet(0, 0, 60000, 0, 0, 0) + icmp,  # header length past the end
        vnet(0x04, 0, 0, 0, 0, 0) + icmp,  # a flag a TUN never hands out
    ]


ECHO_PORT = 9
# Run's namespace takes no new inbound connections from the tunnel, so liveness is shown the
# other way round: the command sends datagrams out and waits for the fake agent's answers.
ECHO_CLIENT = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("{SVC}", {ECHO_PORT}))
s.settimeout(0.3)
def answered(word):
    while True:
        s.send(word)
        try:
            if s.recv(100) == word:
                print(word.decode(), flush=True)
                return
        except TimeoutError:
            pass
answered(b"ready")
sys.stdin.readline()
answered(b"alive")
"""


def udp_answer(pkt: bytes) -> bytes | None:
    """The fake agent's reply to the command's datagram to SVC:ECHO_PORT, as SVC would answer."""
    ip = dpkt.ip.IP(pkt[10:])
    if ip.p != dpkt.ip.IP_PROTO_UDP or ip.data.dport != ECHO_PORT:
        return None
    udp = dpkt.udp.UDP(sport=ECHO_PORT, dport=ip.data.sport, data=ip.data.data)
    udp.ulen = len(bytes(udp))
    return bytes(10) + bytes(dpkt.ip.IP(src=ip.dst, dst=ip.src, p=dpkt.ip.IP_PROTO_UDP, ttl=64, data=udp))


async def answer_datagrams(session: FakeSession) -> None:
    while True:
        kind, body = await session.frames.get()
        if kind == ClientMsg.PACKETS:
            answers = [a for a in map(udp_answer, protocol.unpack_packets(body)) if a]
            if answers:
                session.send(protocol.frame(AgentMsg.PACKETS, protocol.pack_packets(answers)))


def test_hostile_virtio_headers_from_the_agent_are_dropped_and_the_session_survives(box: Sandbox) -> None:
    hostile = hostile_vnet_packets(SVC, CLIENT)

    async def scenario() -> tuple[int, str, str, int]:
        async def talk(session: FakeSession, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            session.send(protocol.control(AgentMsg.WELCOME, GOOD_WELCOME))
            answering = asyncio.ensure_future(answer_datagrams(session))
            try:
                assert await asyncio.wait_for(proc.stdout.readline(), FRAME_TIMEOUT) == b"ready\n"
                session.send(protocol.frame(AgentMsg.PACKETS, protocol.pack_packets(hostile)))
                proc.stdin.write(b"go\n")  # after the hostile batch: the tunnel must still carry traffic
                await proc.stdin.drain()
                assert await asyncio.wait_for(proc.stdout.readline(), FRAME_TIMEOUT) == b"alive\n"
                await asyncio.wait_for(proc.wait(), RUN_TIMEOUT)  # run asks for STATS on its way out
            finally:
                answering.cancel()

        async with fake_agent(box) as (address, sessions):
            return await run_against(box, address, "-v", "--no-mirror", "--", sys.executable, "-c",
                                     ECHO_CLIENT, talk=talk, sessions=sessions)

    rc, _out, err, pid = in_box(box, scenario)
    assert rc == 0, err
    counts = local_dropped(err)
    assert counts.get("dropped_bad_vnet") == len(hostile), counts
    assert "dropped_rejected" not in counts and "Traceback" not in err
    assert left_behind(box, pid) == []


def test_hostile_virtio_headers_from_a_client_never_reach_the_pod(cluster: Cluster) -> None:
    """The agent runs the same check: a malicious client cannot aim the pod kernel's offloads either."""
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        probe = await Probe().open(cluster.sb)
        try:
            me = (await probe.hello()).client_addr
            probe.send(protocol.frame(ClientMsg.PACKETS, protocol.pack_packets(hostile_vnet_packets(me, SVC))))
            before = await probe.stats()
            await probe.ping(me, 0x5EC3)
            return before, await probe.stats()
        finally:
            await probe.close()

    before, after = in_laptop(cluster.sb, scenario)
    assert before.get("dropped_bad_vnet") == len(hostile_vnet_packets("1.1.1.1", "2.2.2.2"))
    assert before.get("packets_in", 0) == 0 and before.get("dropped_rejected", 0) == 0
    assert after["packets_in"] >= 1
    assert_clean(cluster.sb)


def test_deeply_nested_or_huge_subscribe_is_counted_and_the_session_survives(cluster: Cluster) -> None:
    """The agent parses control bodies with the same bounded parser: no RecursionError, no reset."""
    async def scenario() -> dict[str, Any]:
        probe = await Probe().open(cluster.sb)
        try:
            me = (await probe.hello()).client_addr
            probe.send(protocol.frame(ClientMsg.SUBSCRIBE, b'{"ports":' + b"[" * 50_000 + b"]" * 50_000 + b"}"))
            probe.send(protocol.frame(ClientMsg.SUBSCRIBE, b'{"ports":[' + b"80," * 100_000 + b"80]}"))
            await probe.ping(me, 0x5EC4)
            assert not probe.closed.done(), "the agent closed the session"
            return await probe.stats()
        finally:
            await probe.close()

    stats = in_laptop(cluster.sb, scenario)
    assert stats.get("dropped_frames_malformed") == 2
    assert_clean(cluster.sb)
