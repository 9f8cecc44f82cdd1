"""Handing the mirrored traffic to the local program, as if the real client sent it.

The local namespace owns the pod's addresses (on `lo`). Each mirrored TCP
connection becomes a kernel socket with IP_TRANSPARENT, bound to the real
client's address and port, connected to pod-address:local-port; the
reassembled bytes are written into it. The kernel does the TCP work toward the
program (windows, acknowledgements). The program's answers are sent from the
pod's address to the client's, and `install_routing` makes every such packet
local: an nft route chain marks it, a rule sends marked packets to a table
whose only route is `local 0.0.0.0/0`, so they come back up to our socket,
which reads and discards them. `remove_routing` takes exactly that away again
(an attached namespace must be given back as it was), recognising each piece by
a marker of its own, so it also clears what a killed session left. Nothing from
the pod's address can leave through the TUN (and the pump's source check would drop it if it tried). A UDP
server bound to a wildcard answers from the tunnel address instead; those
answers are recognised by their destination, a client address:port we recently
delivered from, and kept local the same way.

UDP datagrams go the same way, from a transparent UDP socket bound to the
client's address and port (kept per client port, read and emptied, closed when
idle): the program sees the real source, its answer is absorbed like a TCP
answer, and no ICMP error is ever made for an answer with nowhere to go.

A slow program is the normal case (a debugger): bytes it does not take wait in
its socket buffers, then in a per-connection `Spill` (memory, then an unnamed
file on disk), up to `spill_limit` over the session (default SPILL_LIMIT);
past that the connection with most waiting is given up (`mirror_spill_given_up`).
Only a program that takes nothing at all for STUCK_TIMEOUT while bytes wait gets
a reset (`mirror_reset_stuck`).

Every byte of a client's stream is accounted for: `mirror_tcp_bytes` taken in ==
`mirror_delivered_bytes` + the `mirror_undelivered_bytes_<reason>` counters (see
`TcpDelivery`). A byte counts as delivered once the program answered after it was
written, or its connection ended normally (or abortively, for what the program's
kernel had already taken). The client's RST (or a hole in the copies) no longer
throws away what waits: the bytes before it are written first, then the program
gets the reset. A program that closes a connection the client keeps using (a
keep-alive limit, nginx's `keepalive_requests`) gets a new connection from the
same client address:port, and the bytes it did not answer are written again there.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import termios
import time
from typing import Callable, Sequence, cast


from mirrord_tun.mirror.backlog import Backlog
from mirrord_tun.mirror.ledger import Ledger
from mirrord_tun.mirror.reassembly import Flow
from mirrord_tun.mirror.spill import SpillTotals
from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns import routes, rtnl
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns")
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75  # the latter is missing from Python's socket module
MARK = 0x6D726E73  # "mrns": our rule is the one with this fwmark, and its table this number
LO_LABEL = "lo:mrdns"  # the label of the pod addresses we put on lo (ours to delete, no others)
LO_PROTO = routes.RTPROT_MIRRORD  # the same for IPv6 addresses, by IFA_PROTO: they have no label
RULE_PRIORITY = 100
NFT_TABLE = "mirrord_ns_mirror"  # one per nft family the pod has addresses of
_NFT_FAMILIES = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
SPILL_LIMIT = 1024 * 1024 * 1024  # per session; past it the connection with most waiting is given up
WRITE_BUFFER = 256 * 1024  # in asyncio's buffer past the socket's own; the rest waits in the spill
CHUNK = 256 * 1024
STUCK_TIMEOUT = 60.0  # a program that takes nothing at all for this long while bytes wait gets a reset
CONNECT_RETRY_FOR = 30.0  # a refused connect (program restarting) is retried this long
CONNECT_RETRY_FIRST = 0.1
CONNECT_RETRY_MAX = 2.0
ANSWER_WAIT = 5.0  # the client's FIN waits this long for the program's answer
GATE_WAIT = 1.0  # a client turn waits this long for the program's answer to the one before
ANSWER_SETTLE = 0.002  # and this long after the last bytes of that answer
LINGER = 30.0  # after the client's FIN, how long the program may keep its end open
UDP_IDLE = 30  # seconds
MAX_UDP_SOCKETS = 256
UDP_QUEUE = 64
_RST_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def install_routing(pod_addrs: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    """Runs in the local namespace; `remove_routing` is its undo.

    Address objects, not strings: they go into an nft script, which must only ever see
    an address there, whatever the agent sent.
    """
    lo = rtnl.index("lo")
    for addr in pod_addrs:
        try:
            if addr.version == 4:
                rtnl.add_address(lo, str(addr), 32, label=LO_LABEL)
            else:  # IPv6 addresses have no label: the address protocol marks ours instead
                rtnl.add_address(lo, str(addr), 128, proto=LO_PROTO)
        except OSError as e:
            if e.errno != errno.EEXIST:  # already local here: not ours, so left alone later
                raise
    script = ""
    for version, (family, addr_type) in _NFT_FAMILIES.items():
        pods = [a for a in pod_addrs if a.version == version]
        if not pods:
            continue
        routes.add_local_delivery(MARK, RULE_PRIORITY, socket.AF_INET if version == 4 else socket.AF_INET6)
        listed = "{ " + ", ".join(map(str, pods)) + " }"
        script += (
            f"table {family} {NFT_TABLE} {{\n"
            # Mirrored UDP peers, remembered from our own deliveries to the pod's address.
            f"  set udp_peers {{ type {addr_type} . inet_service; flags dynamic,timeout; timeout {UDP_IDLE}s; }}\n"
            "  chain output {\n"
            "    type route hook output priority mangle; policy accept;\n"
            f"    {family} saddr {listed} meta mark set {MARK}\n"
            f"    {family} daddr {listed} udp dport 1-65535 update @udp_peers {{ {family} saddr . udp sport }}\n"
            # A UDP server bound to 0.0.0.0 (or ::) answers from the route's source, the tunnel
            # address, not the pod's: catch its answers by where they go instead.
            f"    {family} daddr . udp dport @udp_peers meta mark set {MARK}\n"
            "  }\n}\n"
        )
    nft.run(script)  # one transaction: each table change waits about 16 ms in the kernel


def remove_routing() -> None:
    """Runs in the local namespace: delete what `install_routing` added, and only that.

    Idempotent: each piece is found by its marker (table name, fwmark, table
    number, route protocol, address label or protocol), so the next attach also
    removes a killed one's.
    """
    # Declared first, so deleting an absent table is no error; both in one transaction.
    nft.run("".join(f"table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n"
                    for family, _ in _NFT_FAMILIES.values()))
    routes.remove_local_delivery(MARK)
    lo = rtnl.index("lo")
    for a in rtnl.addresses(socket.AF_INET):
        local = a.address(rtnl.IFA_LOCAL)
        if a.fields[4] == lo and a.text(rtnl.IFA_LABEL) == LO_LABEL and local:
            with contextlib.suppress(OSError):
                rtnl.delete_address(lo, local, a.fields[1])
    with contextlib.suppress(OSError):  # a kernel without IPv6
        for a in rtnl.addresses(socket.AF_INET6):
            local = a.address(rtnl.IFA_ADDRESS)
            if a.fields[4] == lo and a.attrs.get(rtnl.IFA_PROTO) == bytes([LO_PROTO]) and local:
                with contextlib.suppress(OSError):
                    rtnl.delete_address(lo, local, a.fields[1])


def transparent_socket(kind: int, family: int = socket.AF_INET) -> socket.socket:
    """Runs in the local namespace: a socket may bind the client's (foreign) address."""
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def _family(flow: Flow) -> int:
    return socket.AF_INET6 if ":" in flow.client else socket.AF_INET


class TcpDelivery(asyncio.Protocol):
    """One mirrored connection toward the program; tells its owner once, when it is over.

    Bytes go into the socket while its write buffer has room and wait in a
    `Spill` otherwise (also while connecting), so a slow program costs disk, not
    the connection. A refused connect (the program restarting) is retried with
    backoff for CONNECT_RETRY_FOR. A client turn (a new request after the pod's
    answer) waits until the program answered the one before, or GATE_WAIT. The
    client's FIN (or RST) is held until every byte is in the socket and the
    program has answered, or for ANSWER_WAIT at most. A program that closes first
    gets a new connection for the rest, with the bytes it did not answer written
    again (`Ledger`).
    """

    def __init__(self, owner: "Deliveries", flow: Flow, local_port: int) -> None:
        self._owner = owner
        self.flow = flow
        self._port = local_port
        self.spill = Backlog(owner.spilled)
        self.ledger = Ledger(owner.counters)
        self._eof = False
        self._abort = False  # the client's end was a RST: abortive close once everything is written
        self._paused = False
        self._gate: asyncio.TimerHandle | None = None
        self._gate_open = False  # the wait at this turn boundary is over
        self._last_answer = 0.0  # loop time
        self._blind_retry = False  # a new connection after the program closed one without answering
        self._transport: asyncio.Transport | None = None
        self._stuck: asyncio.TimerHandle | None = None
        self._fin: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self.done = False
        self._why = ""  # why it ended, for bytes that still come
        owner.loop.create_task(self._connect())

    async def _connect(self) -> None:
        owner = self._owner
        give_up_at = owner.loop.time() + CONNECT_RETRY_FOR
        delay = CONNECT_RETRY_FIRST
        while True:
            try:
                sock = await self._connect_once()
                break
            except OSError as e:
                # Refused: the program is restarting. Not available: our previous connection on this
                # port pair is still closing (a new connection after the program closed one).
                if self.done or not isinstance(e, ConnectionRefusedError) and e.errno != errno.EADDRNOTAVAIL:
                    self._failed(e)
                    return
                if owner.loop.time() + delay > give_up_at:
                    self._failed(e)
                    return
                owner.counters["mirror_connect_retries"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_RETRY_MAX)
        if self.done:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_ON_CLOSE)
            sock.close()
            return
        try:
            await owner.loop.create_connection(lambda: self, sock=sock)
        except OSError as e:
            self._failed(e)

    async def _connect_once(self) -> socket.socket:
        owner = self._owner
        sock = await owner.ns.acall(transparent_socket, socket.SOCK_STREAM, _family(self.flow))
        try:
            sock.bind((self.flow.client, self.flow.cport))
            await owner.loop.sock_connect(sock, (self.flow.pod, self._port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _failed(self, e: OSError) -> None:
        if self.done:
            return
        self._owner.counters["mirror_connect_failed"] += 1
        self._owner.log_failure(self.flow, self._port, e)
        self._end("connect_failed", 0)

    # called by the owner with the reassembled stream
    def feed(self, data: bytes, turn: bool = False) -> None:
        """Bytes of the client's stream; `turn`: they start a new turn (reassembly.Data.turn)."""
        self._owner.counters["mirror_tcp_bytes"] += len(data)
        if self.done:
            self.ledger.lost(self._why, len(data))
            return
        if self._transport is None or self._paused or len(self.spill) or turn and self.ledger.inflight:
            filed = self.spill.spill.filed
            try:
                self.spill.push(data, turn)
            except OSError as e:  # no spill file (disk full, a bad SPILL_DIR): this copy is lost
                self._owner.counters["mirror_spill_failed"] += 1
                log.warning("mirror: cannot spill: %s", e)
                self.reset("spill_failed")
                self.ledger.lost("spill_failed", len(data))
                return
            self._owner.counters["mirror_spilled_bytes"] += self.spill.spill.filed - filed
            self._flush()
        else:
            self._write(data)

    def finish(self, reset: bool = False) -> None:
        """The client's FIN: half-close (SHUT_WR) once everything is written and answered; its RST
        (`reset`): the same wait, then an abortive close."""
        self._eof = True
        self._abort = reset
        self._flush()

    def superseded(self) -> None:
        """The client reused the port pair: write what waits, then end (with a reset if the
        client's end was never seen)."""
        if not self._eof:
            self.finish(reset=True)

    def reset(self, reason: str) -> None:
        """An abortive close now (the program sees a reset); what was not written is lost for `reason`."""
        if self.done:
            return
        t = self._transport
        unsent = 0
        if t is not None and not t.is_closing():
            sock = t.get_extra_info("socket")
            unsent = t.get_write_buffer_size() + _unsent(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_ON_CLOSE)
            t.abort()
        self._end(reason, unsent)

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)  # may pause us (write buffer past `high`)
        self.ledger.written(data)

    def _flush(self) -> None:
        """Move spilled bytes into the socket while it takes them; then maybe the FIN."""
        t = self._transport
        if t is None or self.done or t.is_closing():
            return
        while not self._paused and len(self.spill):
            if self.spill.at_turn():
                wait = self._turn_wait()
                if wait > 0:
                    if self._gate is None:  # the program's answer to the previous turn comes sooner
                        self._gate = self._owner.loop.call_later(wait, self._open_gate)
                    return
                self.spill.pass_turn()
                self._close_gate()
            self._write(self.spill.pop(CHUNK))
        if self._eof and not len(self.spill) and self._fin is None and self._linger is None:
            if not self.ledger.inflight:
                self._send_fin()
            else:
                self._fin = self._owner.loop.call_later(ANSWER_WAIT, self._send_fin)

    def _turn_wait(self) -> float:
        """How long the next turn must still wait: for the program's answer to the previous one,
        then for that answer to be over (ANSWER_SETTLE without more of it): bytes written while
        the program still answers would be taken for answered, and lost if it then closes."""
        if self._gate_open:
            return 0.0
        if self.ledger.inflight:
            return GATE_WAIT
        return self._last_answer + ANSWER_SETTLE - self._owner.loop.time()

    def _open_gate(self) -> None:
        self._gate, self._gate_open = None, True
        self._flush()

    def _close_gate(self) -> None:
        if self._gate is not None:
            self._gate.cancel()
        self._gate, self._gate_open = None, False

    def _send_fin(self) -> None:
        if self._fin is not None:
            self._fin.cancel()
            self._fin = None
        t = self._transport
        if self._abort:
            self.reset("reset")
        elif t is not None and not t.is_closing() and self._linger is None:
            t.write_eof()
            self._linger = self._owner.loop.call_later(LINGER, self.reset, "linger")

    def _end(self, reason: str, unsent: int) -> None:
        """Over: settle the bytes in flight (`unsent` of them never left our socket) and the spill."""
        self.ledger.settle(reason, unsent)
        self.ledger.lost(reason, len(self.spill))
        self._why = reason
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.spill.close()
            self._cancel_timers()
            self._owner.ended(self)

    def _cancel_timers(self) -> None:
        for timer in (self._stuck, self._fin, self._linger):
            if timer:
                timer.cancel()
        self._stuck = self._fin = self._linger = None
        self._close_gate()

    def _reconnect(self, replay: bytes) -> None:
        """The program closed while the client's stream goes on: the rest, from the first byte it
        did not answer, on a new connection from the same client address:port."""
        self._owner.counters["mirror_reconnects"] += 1
        waiting = len(self.spill)
        try:
            self.spill.requeue(replay, CHUNK)
        except OSError as e:
            log.warning("mirror: cannot spill: %s", e)
            self._owner.counters["mirror_spill_failed"] += 1
            self.ledger.lost("spill_failed", len(replay) + waiting - len(self.spill))
            self._end("spill_failed", 0)  # counts what did get queued again
            return
        self._transport, self._paused = None, False
        self._cancel_timers()
        self._owner.loop.create_task(self._connect())

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        # Small: what the socket does not take waits in the spill, on disk past its memory cap.
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._owner.counters["mirror_answer_bytes"] += len(data)
        self.ledger.answered()
        self._last_answer = self._owner.loop.time()
        if self._fin is not None:  # set only once nothing waits
            self._send_fin()
        elif len(self.spill):
            self._close_gate()  # waits again, now for the answer to settle
            self._flush()

    def eof_received(self) -> bool:
        return False  # the program closed its end: close ours

    def pause_writing(self) -> None:
        self._paused = True
        self._stuck = self._owner.loop.call_later(STUCK_TIMEOUT, self._stuck_reset)

    def resume_writing(self) -> None:
        self._paused = False
        if self._stuck:
            self._stuck.cancel()
            self._stuck = None
        self._flush()

    def _stuck_reset(self) -> None:
        self._owner.counters["mirror_reset_stuck"] += 1
        self.reset("stuck")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if self._linger is not None or (self._eof and not self._abort and not len(self.spill)):
            self._end("program_closed", 0)  # after the client's end: the normal way
            return
        replay = self.ledger.take_replay()
        if replay is None:
            # What it took unanswered is lost; what waits may still go, once: it may only be
            # exiting (the session ends), or close every connection it gets.
            if self._blind_retry:
                self._end("program_closed", self.ledger.inflight)
                return
            self._blind_retry = True
            self.ledger.settle("program_closed", self.ledger.inflight)
            replay = b""
        self._reconnect(replay)


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue the program's kernel has not acknowledged."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


class UdpDelivery:
    """Datagrams from one client address:port; answers read and dropped."""

    def __init__(self, owner: "Deliveries", flow: Flow, local_port: int) -> None:
        self._owner = owner
        self.flow = flow
        self._port = local_port
        self._sock: socket.socket | None = None
        self._queue: list[bytes] = []  # while the socket is being made, up to UDP_QUEUE
        self._closed = False
        self.seen = time.monotonic()
        owner.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            sock = await self._owner.ns.acall(transparent_socket, socket.SOCK_DGRAM, _family(self.flow))
            sock.bind((self.flow.client, self.flow.cport))
        except OSError as e:
            self._owner.counters["mirror_udp_failed"] += 1
            self._owner.log_failure(self.flow, self._port, e)
            self._queue.clear()
            return
        if self._closed:  # expired while the socket was being made
            sock.close()
            return
        self._sock = sock
        self._owner.loop.add_reader(sock.fileno(), self._drain)
        for payload in self._queue:
            self.send(payload)
        self._queue.clear()

    def send(self, payload: bytes) -> None:
        self.seen = time.monotonic()
        c = self._owner.counters
        if self._sock is None:
            if len(self._queue) < UDP_QUEUE:
                self._queue.append(payload)
            else:
                c["mirror_udp_dropped"] += 1
            return
        try:
            self._sock.sendto(payload, (self.flow.pod, self._port))
            c["mirror_udp_datagrams"] += 1
        except OSError:
            c["mirror_udp_dropped"] += 1

    def _drain(self) -> None:
        assert self._sock is not None
        try:
            while True:
                self._owner.counters["mirror_answer_bytes"] += len(self._sock.recv(65536))
        except OSError:
            pass  # EAGAIN, or a queued ICMP error from an earlier send

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._owner.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class Deliveries:
    """All local deliveries of one session; `local_port` maps a pod port to the program's port."""

    def __init__(self, ns: NetNs, local_port: Callable[[int], int], counters: Counters,
                 on_given_up: Callable[[Flow], None], log_failure: Callable[[Flow, int, OSError], None],
                 spill_limit: int = SPILL_LIMIT) -> None:
        self.ns = ns
        self._spill_limit = spill_limit
        self.spilled = SpillTotals()
        self.loop = asyncio.get_running_loop()
        self.counters = counters
        self.log_failure = log_failure
        self._local_port = local_port
        self._on_given_up = on_given_up
        self.tcp: dict[Flow, TcpDelivery] = {}
        self._leaving: set[TcpDelivery] = set()  # still delivering, their port pair already reused
        self.udp: dict[Flow, UdpDelivery] = {}

    def open(self, flow: Flow) -> None:
        old = self.tcp.pop(flow, None)  # taken out first: its end must not touch the new stream
        if old is not None:  # the client reused the port pair; the new connect waits for the old to go
            self._leaving.add(old)
            old.superseded()
        self.tcp[flow] = TcpDelivery(self, flow, self._local_port(flow.port))
        self.counters["mirror_tcp_connections"] += 1

    def data(self, flow: Flow, data: bytes, turn: bool = False) -> None:
        conn = self.tcp.get(flow)
        if conn is None:
            return
        conn.feed(data, turn)
        if self.spilled.waiting > self._spill_limit:
            self.counters["mirror_spill_given_up"] += 1
            victim = max(self.tcp.values(), key=lambda c: len(c.spill))
            log.warning("mirror: %s:%d given up: the local program is more than %d MiB behind",
                        victim.flow.client, victim.flow.cport, self._spill_limit >> 20)
            victim.reset("spill_limit")

    def close(self, flow: Flow, reset: bool) -> None:
        conn = self.tcp.get(flow)
        if conn is None:
            return
        conn.finish(reset)

    def datagram(self, flow: Flow, payload: bytes) -> None:
        sock = self.udp.get(flow)
        if sock is None:
            if len(self.udp) >= MAX_UDP_SOCKETS:
                self.udp.pop(min(self.udp, key=lambda f: self.udp[f].seen)).close()
            sock = self.udp[flow] = UdpDelivery(self, flow, self._local_port(flow.port))
        sock.send(payload)

    def ended(self, conn: TcpDelivery) -> None:
        self._leaving.discard(conn)
        if self.tcp.get(conn.flow) is conn:
            del self.tcp[conn.flow]
            self._on_given_up(conn.flow)

    def expire_udp(self, now: float) -> None:
        for flow in [f for f, s in self.udp.items() if now - s.seen > UDP_IDLE]:
            self.udp.pop(flow).close()

    def close_all(self) -> None:
        for conn in [*self.tcp.values(), *self._leaving]:
            conn.reset("session_end")
        for sock in self.udp.values():
            sock.close()
        self.udp.clear()
