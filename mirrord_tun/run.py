"""`mirrord-ns run`: the local end of a session.

Connect to the agent, get a tunnel address, make a fresh network namespace whose
default route is a TUN, start the command in it as the invoking user, pump
packets until the command exits, then take everything down.

When the SSH connection drops (not when the agent ends the session), the command
keeps running: `run` reconnects with backoff for as long as the agent keeps the
session (its resume_timeout, from WELCOME v4) and resumes it with the session's
secret; the TUN, namespace and command stay as they are, and packets the command
sends meanwhile are dropped (its TCP retransmits them).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Awaitable, Callable

import asyncssh

from mirrord_tun import protocol
from mirrord_tun.channel import FrameSession
from mirrord_tun.connect import Gone, SetupError, open_channel, printable
from mirrord_tun.mirror import Mirror
from mirrord_tun.mirror.delivery import SPILL_LIMIT
from mirrord_tun.mirror.ports import POLL_INTERVAL, steal_ports
from mirrord_tun.mounts import Mounts
from mirrord_tun.netns import exec as nsexec
from mirrord_tun.netns import ipv6, links, routes, sockdiag
from mirrord_tun.netns.namespace import NetNs, pids_in
from mirrord_tun.netns.tun import Tun
from mirrord_tun.progress import QUIET
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump, destination_is, source_is

log = logging.getLogger("mirrord-ns")
TUN_NAME = "mrd0"
WELCOME_TIMEOUT = 15
KILL_GRACE = 3.0
LINK_LOST = 2  # exit status when the tunnel dies under the command
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 5.0  # backoff between attempts to reach the agent again
STEAL_ANSWER_TIMEOUT = 15  # for the agent's STEAL_STATE (a liveness bound)
UNSTEAL_WAIT = 0.5  # at the end, for the agent to confirm it gave the ports back
# Routes traffic into the named TUN, inside the namespace; returns an undo or None.
Steer = Callable[[str], "Callable[[], None] | None"]


DEFAULT_HTTP_PORTS = (80, 8080)  # mirrord's http_filter.ports default


@dataclasses.dataclass(frozen=True)
class HttpFilterSpec:
    """The --http-*-filter options as given (checked with steal.filters.HttpFilter.compile)."""

    header: str | None = None
    path: str | None = None
    method: str | None = None
    all_of: tuple[tuple[str, str], ...] = ()  # (kind, pattern)
    any_of: tuple[tuple[str, str], ...] = ()
    ports: tuple[int, ...] = ()  # --http-filter-ports; empty: DEFAULT_HTTP_PORTS and every --port

    def given(self) -> bool:
        return any((self.header is not None, self.path is not None, self.method is not None, self.all_of, self.any_of))


@dataclasses.dataclass(frozen=True)
class StealOptions:
    """`--steal`: the pod's connections to the program's ports go to the program instead."""

    ports: dict[int, int]  # --port: pod port -> local port, stolen (over TCP) whether served or not
    exclude: tuple[str, ...] = ()  # source CIDRs that keep reaching the pod (checked with protocol.cidr)
    # With a filter, the HTTP ports' requests are stolen one by one, only those that match; the
    # other TCP ports are stolen whole if named with --port, else left to the pod; UDP whole.
    http: HttpFilterSpec = HttpFilterSpec()

    def http_ports(self) -> set[int]:
        return set(self.http.ports) if self.http.ports else {*DEFAULT_HTTP_PORTS, *self.ports}

    def request(self, tcp: dict[int, int], udp: dict[int, int]) -> protocol.StealRequest:
        if not self.http.given():
            return protocol.StealRequest(tcp, udp, self.exclude)
        http = self.http_ports()
        filtered_ports = sorted(p for p in tcp if p in http)
        if len(filtered_ports) > protocol.MAX_FILTERED:
            log.warning("filtering the lowest %d of %d ports", protocol.MAX_FILTERED, len(filtered_ports))
        h = self.http
        filtered = tuple(protocol.FilteredSteal(p, tcp[p], h.header, h.path, h.method, h.all_of, h.any_of)
                         for p in filtered_ports[:protocol.MAX_FILTERED])
        whole = {p: l for p, l in tcp.items() if p not in http and p in self.ports}
        return protocol.StealRequest(whole, udp, self.exclude, filtered)


class Stealer:
    """run's side of steal: asks the agent for the ports the program serves (and --port), and
    lets exactly those into the namespace through the inbound guard."""

    def __init__(self, ns: NetNs, client_addrs: list[str], options: StealOptions,
                 send: Callable[[bytes], None]) -> None:
        """`client_addrs`: the tunnel's addresses, IPv4 and (when the session carries it) IPv6."""
        if not any(":" in a for a in client_addrs):
            # IPv6 sources mean nothing to an IPv4-only session, and an agent older than IPv6 takes
            # a STEAL naming one for malformed (and never answers it).
            options = dataclasses.replace(options, exclude=tuple(c for c in options.exclude if ":" not in c))
        self._ns, self._clients, self._opts, self._send = ns, client_addrs, options, send
        self._wanted: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._answer: asyncio.Future[protocol.StealState] | None = None
        self._warned: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stale = False  # the agent withdrew the steal while we were away: ask again

    async def start(self) -> None:
        """Steal before the command starts; a --port the agent refuses is a SetupError."""
        state = await self._ask(*await self._serving())
        explicit = {f"tcp/{p}" for p in self._opts.ports}
        refused = [f"{name}: {printable(why)}" for name, why in sorted(state.refused.items()) if name in explicit]
        if refused:
            raise SetupError(f"cannot steal {'; '.join(refused)}")
        self._warn(state)
        self._task = asyncio.create_task(self._follow())

    def on_state(self, state: protocol.StealState) -> bool:
        """The agent's STEAL_STATE; False if none was asked for."""
        if self._answer is None or self._answer.done():
            return False
        self._answer.set_result(state)
        return True

    def on_resumed(self) -> None:
        """The agent gives a detached session's ports back to the pod: ask for them again now."""
        if self._answer is not None and not self._answer.done():
            self._send(protocol.steal(self._opts.request(*self._wanted)))  # its answer ends the pending ask
        else:
            self._stale = True  # asked at the next poll, at most POLL_INTERVAL away

    async def stop(self, connected: bool) -> None:
        """Give the ports back before the session closes (the agent's teardown would, a little later)."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if connected and any(self._wanted):
            with contextlib.suppress(asyncio.TimeoutError, SetupError):
                await asyncio.wait_for(self._ask({}, {}), UNSTEAL_WAIT)

    async def _serving(self) -> tuple[dict[int, int], dict[int, int]]:
        tcp, udp = await self._ns.acall(sockdiag.serving_ports, self._clients)
        return steal_ports(tcp, udp, self._opts.ports)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            wanted = await self._serving()
            if wanted != self._wanted or self._stale:
                self._stale = False
                try:
                    self._warn(await self._ask(*wanted))
                except SetupError as e:  # e.g. lost with the connection: asked again at the next poll
                    log.warning("%s", e)
                    self._stale = True

    async def _ask(self, tcp: dict[int, int], udp: dict[int, int]) -> protocol.StealState:
        # The guard lets in the old and the new ports while the agent switches, then the new only.
        old_tcp, old_udp = self._wanted
        await self._guard({*old_tcp.values(), *tcp.values()}, {*old_udp.values(), *udp.values()})
        self._wanted = (tcp, udp)
        self._answer = asyncio.get_running_loop().create_future()
        self._send(protocol.steal(self._opts.request(tcp, udp)))
        try:
            state = await asyncio.wait_for(self._answer, STEAL_ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            raise SetupError(f"the agent did not answer STEAL within {STEAL_ANSWER_TIMEOUT} s") from None
        # Then only what the agent says it steals: a refused port stays shut, whatever the agent sends.
        await self._guard({l for p, l in tcp.items() if f"tcp/{p}" in state.stolen},
                          {l for p, l in udp.items() if f"udp/{p}" in state.stolen})
        log.info("stealing %s", " ".join(state.stolen) or "nothing")
        return state

    async def _guard(self, tcp: set[int], udp: set[int]) -> None:
        await self._ns.acall(routes.refuse_inbound, TUN_NAME, self._clients, tcp, udp)

    def _warn(self, state: protocol.StealState) -> None:
        for name, why in sorted(state.refused.items()):
            if name not in self._warned:
                self._warned.add(name)
                print(f"mirrord-ns: not stealing {name}: {printable(why)}", file=sys.stderr, flush=True)


class LocalSession:
    # --mount: the container's directories in the command's mount namespace (set by the caller).
    mounts: Mounts | None = None

    def __init__(self, argv: list[str], agent: str, key: asyncssh.SSHKey, pinned: asyncssh.SSHKey,
                 sock: socket.socket | None = None, env: dict[str, str] | None = None,
                 mirror_ports: dict[int, int] | None = None, steal: StealOptions | None = None,
                 spill_limit: int = SPILL_LIMIT) -> None:
        self.argv = argv
        self.progress = QUIET  # `run --target`'s status line, closed before the command starts
        self.steal = steal  # replaces the mirror (give mirror_ports=None with it)
        self.stealer: Stealer | None = None
        # Inbound mirror: pod port -> local port given with --port (learned ports come on top);
        # None turns the mirror off. Its routing (mirror/delivery.py) is undone when it stops.
        self.mirror_ports = mirror_ports
        self.spill_limit = spill_limit  # bytes the program may fall behind the mirror, on disk
        self.mirror: Mirror | None = None
        # Pod addresses not to make local in the namespace: `attach` puts the agent's there
        # when our own SSH connection to it lives in that namespace.
        self.mirror_exclude: set[str] = set()
        self.sock = sock  # SSH runs over this (a Kubernetes port-forward) instead of dialing `agent`
        # A fresh such socket for each reconnect (a new port-forward); None: dial `agent` again.
        self.new_sock: Callable[[], socket.socket] | None = None
        self.env = env or {}  # on top of ours for the command: the target container's environment
        self.agent = agent
        self.agent_ip: str | None = None  # the agent's IP as connected (None over a port-forward socket)
        self.key, self.pinned = key, pinned
        self.counters: Counters = Counters()
        self.chan = FrameSession(self)
        self.pump: TunPump | None = None
        loop = asyncio.get_running_loop()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._welcome: asyncio.Future[protocol.Welcome] = loop.create_future()
        self._session: protocol.Welcome | None = None  # the first WELCOME: what a resume must match
        self._stats: asyncio.Future[dict[str, int]] | None = None
        self._lost: asyncio.Future[str] = loop.create_future()
        self._dropped = False  # the connection died under us (resumable), rather than being closed
        self._up = False  # a session is open on the current connection

    # Endpoint
    def on_frame(self, kind: int, body: bytes) -> None:
        if kind == AgentMsg.PACKETS and self.pump:
            self.pump.deliver(body)
            return
        if kind == AgentMsg.MIRROR and self.mirror:
            self.mirror.deliver(body)
            return
        try:
            if kind == AgentMsg.WELCOME and not self._welcome.done():
                self._welcome.set_result(protocol.Welcome.from_json(protocol.parse_control(body)))
            elif kind == AgentMsg.ERROR:
                msg = printable(protocol.parse_control(body).get("error"))
                resuming = self._session is not None and not self._welcome.done()
                if not self._welcome.done():
                    self._welcome.set_exception(_Refused(f"agent refused the session: {msg}"))
                if not resuming:  # a refused resume is said once, in the line that ends the session
                    log.error("agent: %s", msg)
            elif kind == AgentMsg.STEAL_STATE and self.stealer:
                if not self.stealer.on_state(protocol.StealState.from_json(protocol.parse_control(body))):
                    self.counters["dropped_frames_unexpected"] += 1
            elif kind == AgentMsg.STATS and self._stats and not self._stats.done():
                self._stats.set_result({k: v for k, v in protocol.parse_control(body).items()
                                        if type(v) is int and _COUNTER.fullmatch(k)})
            else:
                self.counters["dropped_frames_unexpected"] += 1
        except protocol.Malformed as e:
            self.counters["dropped_frames_malformed"] += 1
            if not self._welcome.done():
                self._welcome.set_exception(SetupError(f"agent sent a bad {protocol.kind_name(kind)}: {e}"))

    def on_pause(self) -> None:
        if self.pump:
            self.pump.pause()

    def on_resume(self) -> None:
        if self.pump:
            self.pump.resume()

    def on_closed(self, exc: Exception | None) -> None:
        reason = printable(str(exc)) if exc else "the agent closed the session"  # may quote the agent
        self._up = False
        if self.pump:  # nothing to send packets to until a resume
            self.pump.pause()
        if not self._welcome.done():
            self._welcome.set_exception(SetupError(f"agent {self.agent}: {reason}"))
        if not self._lost.done():
            self._dropped = exc is not None
            self._lost.set_result(reason)

    def write(self, data: bytes) -> None:
        """To the current connection; while there is none, dropped and counted."""
        if not self.chan.write(data):
            self.counters["dropped_frames_closed"] += 1

    async def agent_stats(self) -> dict[str, int]:
        self._stats = asyncio.get_running_loop().create_future()
        self.chan.write(protocol.control(ClientMsg.STATS, {}))
        return await asyncio.wait_for(self._stats, 5)

    async def run(self) -> int:
        """`run`: a fresh namespace whose default route is the tunnel, CMD in it."""
        return await self.serve(NetNs.new, links.make_default_via, self._run_in)

    async def serve(self, open_ns: Callable[[], NetNs], steer: Steer,
                    use: Callable[[NetNs, protocol.Welcome], Awaitable[int]]) -> int:
        """Connect, bring the tunnel into the namespace `open_ns` gives, `use` it, take it all down.

        `steer(tun_name)` runs inside the namespace once the TUN has its address and
        routes traffic into it; it may return an undo (also run there, after the TUN
        is gone) for what does not vanish with the TUN. `run` and `attach` differ
        only in these three.
        """
        self.progress.step("connecting to the agent…")
        self._conn = conn = await open_channel(self.agent, self.key, self.pinned, self.chan, sock=self.sock)
        self.progress.step("connected; opening the tunnel…")
        peer = conn.get_extra_info("peername")
        # Where our SSH packets go: `attach` keeps this address off the tunnel.
        self.agent_ip = peer[0] if isinstance(peer, tuple) and peer else None
        ns: NetNs | None = None
        tun: Tun | None = None
        undo: Callable[[], None] | None = None
        try:
            self.chan.write(protocol.control(ClientMsg.HELLO, {"version": protocol.VERSION}))
            try:
                welcome = await asyncio.wait_for(self._welcome, WELCOME_TIMEOUT)
            except asyncio.TimeoutError:
                raise SetupError(f"agent {self.agent}: no WELCOME within {WELCOME_TIMEOUT} s") from None
            self._session, self._up = welcome, True
            log.info("session %s: tunnel address %s, pod %s, mtu %d", welcome.session,
                     ",".join(welcome.client_addrs), ",".join(welcome.pod_addrs + welcome.pod_addrs6) or "?", welcome.mtu)
            if welcome.ipv6_off:
                print(f"mirrord-ns: the pod has IPv6, but this session is IPv4 only: {printable(welcome.ipv6_off)}",
                      file=sys.stderr, flush=True)
            if self.mounts:  # checked before anything starts: a missing PATH is one line, exit 2
                await self.mounts.prepare(conn)
            ns = open_ns()
            tun = ns.call(Tun, TUN_NAME)
            ns.call(links.bring_up_tun, tun.name, welcome.client_addrs, welcome.mtu)
            undo = ns.call(steer, tun.name)
            self.pump = TunPump(tun.fd, self.write, ClientMsg.PACKETS,
                                admit_out=source_is(*welcome.client_addrs),
                                admit_in=destination_is(*welcome.client_addrs), counters=self.counters)
            self.pump.start()
            if self.steal is not None:
                if welcome.version < protocol.STEAL_VERSION:
                    raise SetupError(f"the agent speaks protocol {welcome.version}, too old to steal "
                                     f"(needs {protocol.STEAL_VERSION})")
                h = self.steal.http
                if welcome.version < protocol.FILTER_VERSION and (h.method is not None or h.all_of or h.any_of):
                    raise SetupError(f"the agent speaks protocol {welcome.version}, too old for method, all-of "
                                     f"and any-of filters (needs {protocol.FILTER_VERSION})")
                self.stealer = Stealer(ns, welcome.client_addrs, self.steal, self.write)
                await self.stealer.start()
            elif self.mirror_ports is not None and welcome.version < protocol.MIRROR_VERSION:
                log.warning("the agent speaks protocol %d, too old to mirror inbound traffic", welcome.version)
            elif self.mirror_ports is not None and welcome.pod_addrs:
                addrs = self._mirrorable(welcome.pod_addrs + welcome.pod_addrs6, ns.call(ipv6.enabled))
                if addrs:
                    self.mirror = Mirror(ns, addrs, [*welcome.pod_addrs, *welcome.pod_addrs6, *welcome.client_addrs,
                                                     welcome.agent_addr, welcome.agent_addr6],
                                         self.mirror_ports, self.write, self.counters, self.spill_limit)
                    await self.mirror.start()
            return await use(ns, welcome)
        finally:
            if self.stealer:
                await self.stealer.stop(connected=self._up)
            if self.mirror:
                await self.mirror.stop()
            if self.pump:
                self.pump.stop()
            if tun is not None:
                tun.close()
            if ns is not None:
                try:
                    if undo is not None:
                        ns.call(undo)
                finally:
                    ns.close()
            if self.mounts:
                await self.mounts.stop()
            if log.isEnabledFor(logging.INFO) and self._up:
                await self._log_counters()
            await _close(self._conn)

    async def until_lost(self, *others: asyncio.Future[object]) -> str | None:
        """Keep the tunnel up until one of `others` is done (None), resuming the session after a
        dropped connection; the one line to say (without our prefix) once it is lost for good."""
        while True:
            await asyncio.wait([*others, self._lost], return_when=asyncio.FIRST_COMPLETED)
            if any(f.done() for f in others):
                return None
            reason = self._lost.result()
            grace = self._session.resume_timeout if self._session else 0
            if not self._dropped or grace <= 0:
                return f"lost the tunnel: {reason}"
            # Lines, not a redrawn status line: the command owns the terminal by now.
            log.warning("lost the agent (%s); reconnecting…", reason)
            since = asyncio.get_running_loop().time()
            reconnecting = asyncio.ensure_future(self._reconnect(grace))
            try:
                await asyncio.wait([*others, reconnecting], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not reconnecting.done():
                    reconnecting.cancel()
                    await asyncio.gather(reconnecting, return_exceptions=True)
            if not reconnecting.done() or reconnecting.cancelled():
                return None
            failed = reconnecting.result()
            if failed:
                return f"cannot resume the session: {failed}"
            log.warning("resumed after %.1f s", asyncio.get_running_loop().time() - since)

    async def _reconnect(self, grace: float) -> str | None:
        """Try again with backoff while the agent keeps the session; None once resumed, else why not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        delay = RECONNECT_FIRST
        while True:
            try:
                await asyncio.wait_for(self._resume(), max(1.0, deadline - loop.time()))
                return None
            except Gone as e:  # the agent said no (expired, another agent), or its pod is gone
                return str(e)
            except SetupError as e:
                last = str(e)
            except asyncio.TimeoutError:
                last = "no answer"
            if loop.time() + delay >= deadline:
                return f"{last} (gave up after the agent's {grace:g} s grace period)"
            log.info("reconnect failed: %s; again in %g s", last, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _resume(self) -> None:
        """One attempt: a new connection (and port-forward), RESUME, and the same WELCOME again."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        self.chan.endpoint = None  # the old channel has nothing more to say
        self.chan = FrameSession(self)
        self._welcome, self._lost, self._dropped = loop.create_future(), loop.create_future(), False
        sock = await self._new_sock() if self.new_sock else None
        conn = await open_channel(self.agent, self.key, self.pinned, self.chan, sock=sock)
        try:
            self.chan.write(protocol.resume(self._session.session, self._session.secret))
            try:
                welcome = await asyncio.wait_for(self._welcome, WELCOME_TIMEOUT)
            except asyncio.TimeoutError:
                raise SetupError(f"agent {self.agent}: no WELCOME within {WELCOME_TIMEOUT} s") from None
            if (welcome.session, welcome.client_addr) != (self._session.session, self._session.client_addr):
                raise _Refused(f"the agent resumed another session ({printable(welcome.session)})")
        except BaseException:
            await _close(conn)
            raise
        old, self._conn = self._conn, conn
        await _close(old)
        self._up = True
        self.counters["resumed"] += 1
        log.info("session %s resumed", welcome.session)
        if self.pump:
            self.pump.resume()
        if self.stealer:
            self.stealer.on_resumed()
        if self.mounts:
            self.mounts.reopen(conn)

    async def _new_sock(self) -> socket.socket:
        assert self.new_sock is not None
        try:
            return await asyncio.to_thread(self.new_sock)  # API calls: off the event loop
        except SetupError:
            raise
        except Exception as e:  # noqa: BLE001 - the cluster client's own (websocket) errors: try again
            raise SetupError(f"cannot reach the agent pod: {printable(str(e))}") from None

    def _mirrorable(self, pod_addrs: list[str], local_ipv6: bool) -> list[str]:
        """The pod addresses the mirror can make local here; one clear warning for the others, whose
        copies are then dropped and counted (dropped_mirror_destination)."""
        addrs = [a for a in pod_addrs if a not in self.mirror_exclude]
        if len(addrs) < len(pod_addrs):
            print(f"mirrord-ns: not mirroring traffic to {', '.join(sorted(set(pod_addrs) - set(addrs)))}: "
                  f"it is the agent's address, which must stay reachable from this namespace",
                  file=sys.stderr, flush=True)
        if not local_ipv6 and any(":" in a for a in addrs):  # an attached container with IPv6 off
            print("mirrord-ns: not mirroring the pod's IPv6 clients: IPv6 is disabled in this namespace",
                  file=sys.stderr, flush=True)
            addrs = [a for a in addrs if ":" not in a]
        return addrs

    async def _run_in(self, ns: NetNs, welcome: protocol.Welcome) -> int:
        self.progress.close()  # the terminal is the command's from here
        resolv = _write_resolv_conf(welcome.resolv_conf)
        try:
            return await self._run_command(ns, resolv)
        finally:
            await _reap_namespace(ns)
            if resolv:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(resolv)

    async def _run_command(self, ns: NetNs, resolv: str | None) -> int:
        # Handlers go in before the command exists: a signal that lands while spawn() runs (the
        # command may already have the terminal) then waits in the loop and is forwarded, instead
        # of meeting asyncio's SIGINT handler (cancel, exit 130) or killing `run` unclean (SIGTERM).
        loop = asyncio.get_running_loop()
        pid: list[int] = []  # the command's, once spawned
        _forward_signals(loop, pid)
        try:
            return await self._spawn_and_wait(ns, resolv, pid)
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    async def _spawn_and_wait(self, ns: NetNs, resolv: str | None, pid: list[int]) -> int:
        try:
            proc = nsexec.spawn(self.argv, ns.fd, resolv, nsexec.invoking_user(), self.env,
                                mounts=self.mounts)
        except FileNotFoundError:
            print(f"mirrord-ns: {self.argv[0]}: command not found", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"mirrord-ns: {self.argv[0]}: permission denied", file=sys.stderr)
            return 126
        except OSError as e:  # ENOEXEC, ENOTDIR, ELOOP...: a shell also says 126, in one line
            print(f"mirrord-ns: {self.argv[0]}: cannot execute: {e.strerror}", file=sys.stderr)
            return 126
        except subprocess.SubprocessError as e:  # the namespace, mount or user switch failed
            raise SetupError(f"cannot start {self.argv[0]} in the namespace: {e}") from None
        if resolv:
            # The bind mount holds the file now; unlinked, it cannot outlive a killed `run`.
            os.unlink(resolv)
        exited = asyncio.ensure_future(process_exit(proc.pid))
        pid.append(proc.pid)
        try:
            lost = await self.until_lost(exited)
            if lost is not None:
                print(f"mirrord-ns: {lost}; stopping the command", file=sys.stderr)
                if self.mounts:
                    self.mounts.lost()
                proc.terminate()
                try:
                    await asyncio.wait_for(exited, KILL_GRACE)
                except asyncio.TimeoutError:
                    proc.kill()
                proc.wait()
                return LINK_LOST
            rc = proc.wait()
            return 128 - rc if rc < 0 else rc
        finally:
            exited.cancel()

    async def _log_counters(self) -> None:
        c = self.counters
        log.info("local: %d packets / %d bytes sent, %d packets / %d bytes received, dropped: %s",
                 c["packets_out"], c["bytes_out"], c["packets_in"], c["bytes_in"],
                 {k: v for k, v in c.items() if k.startswith("dropped_")} or "none")
        try:
            stats = await self.agent_stats()
            log.info("agent: %s", ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        except (asyncio.TimeoutError, protocol.Malformed):
            pass


_COUNTER = re.compile(r"[a-z0-9_]{1,64}")


class _Refused(Gone):
    """The agent answered and said no: trying again cannot help."""


async def _close(conn: asyncssh.SSHClientConnection | None) -> None:
    if conn is None:
        return
    conn.close()
    try:
        await asyncio.wait_for(conn.wait_closed(), 2)
    except asyncio.TimeoutError:
        pass


async def process_exit(pid: int) -> None:
    """Return when process `pid` exits (its pidfd turns readable), without reaping it."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


def _forward_signals(loop: asyncio.AbstractEventLoop, pid: list[int]) -> None:
    """Pass signals on to the command, except keyboard ones it already got from the terminal."""
    def forward(sig: signal.Signals) -> None:
        if sig in (signal.SIGINT, signal.SIGQUIT) and _terminal_foreground():
            return
        for p in pid:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, forward, sig)


def _terminal_foreground() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False


RESOLV_DIR = "/run"
RESOLV_PREFIX = "mirrord-ns-resolv."


def _write_resolv_conf(text: str) -> str | None:
    """The pod's resolv.conf in a file for the command's bind mount (unlinked once it is mounted).

    Its name carries our PID, so one a SIGKILL left behind is recognisably stale.
    """
    if not text.strip():
        log.warning("the agent sent no resolver configuration; keeping this host's /etc/resolv.conf")
        return None
    remove_stale_resolv_files()
    fd, path = tempfile.mkstemp(prefix=f"{RESOLV_PREFIX}{os.getpid()}.",
                                dir=RESOLV_DIR if os.access(RESOLV_DIR, os.W_OK) else None)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def remove_stale_resolv_files() -> list[str]:
    """Files of `run`s that died between writing and mounting them."""
    removed = []
    for path in glob.glob(os.path.join(RESOLV_DIR, RESOLV_PREFIX + "*")):
        pid = os.path.basename(path)[len(RESOLV_PREFIX):].partition(".")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


async def _reap_namespace(ns: NetNs) -> None:
    """Stop whatever the command left running in the namespace (daemons, stray children)."""
    loop = asyncio.get_running_loop()

    def left() -> list[int]:
        return [p for p in pids_in(ns.ident) if p != os.getpid()]

    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 2.0)):
        pids = left()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = loop.time() + wait
        while loop.time() < deadline:
            await asyncio.sleep(0.02)
            if not left():
                return
