"""Filtered steal for HTTP/2 with prior knowledge (h2c, gRPC): each stream routed by the filter.

Owns: the HTTP/2 side of one client connection (`H2Router`) and its upstream HTTP/2 connections.
May touch: the client's transport and the links it opens through its opener; nothing of the kernel's.

A client connection that opens with the HTTP/2 preface is served by `H2Router`
(python-hyper's h2): it terminates HTTP/2 toward the client and keeps one HTTP/2
connection per upstream (the pod's server, each session's program), opened when a
stream first needs it. Every request stream is routed by its headers (`:method`,
`:path`, the rest as `name: value`) like an HTTP/1 request, so one connection may
carry streams for the pod and for the local program. Headers, data, trailers and
resets are relayed per stream; flow control is end to end: data received on one
side is acknowledged only once it was sent on to the other, so the proxy holds at
most a window per stream.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
from typing import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.exceptions
import hyperframe.frame

from mirrord_tun.agent.steal.upstream import Link

log = logging.getLogger("mirrord-ns.agent")

# The proxy's side of every upstream connection: no server push. A pushed stream has no client
# request to answer, and its DATA, never acknowledged, would use up the connection's window and
# stall every other stream on it.
_NO_PUSH = {h2.settings.SettingCodes.ENABLE_PUSH: 0}
Chooser = Callable[[object], object]  # http1.Chooser, taking an http1.RequestHead


class _Stream:
    """One request stream: its ids on both sides and the bytes waiting for a window."""

    def __init__(self, down_id: int) -> None:
        self.down_id, self.up_id = down_id, 0
        self.link: Link | None = None
        self.up: h2.connection.H2Connection | None = None
        self.to_up: collections.deque = collections.deque()  # (data, flow length) or None: end
        self.to_down: collections.deque = collections.deque()
        self.ended = False  # the client's side of the stream ended (queued for the upstream)


class _Relay:
    """Both sides' HTTP/2 connections and the per-stream queues between them."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.down = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.down.initiate_connection()
        self.ups: dict[int, tuple[Link, h2.connection.H2Connection]] = {}  # by id(link)
        self.streams: dict[int, _Stream] = {}  # by down stream id
        self.by_up: dict[tuple[int, int], _Stream] = {}  # (id(link), up stream id)
        # Streams waiting for room on an upstream, by id(link): until its server's SETTINGS came
        # (its concurrency limit) and while it has that many streams open. The client was told
        # our limit, not the server's: without this wait the server refuses the ones past its own.
        self.waiting: dict[int, collections.deque[tuple[_Stream, Callable[[Link], None]]]] = {}
        self.settled: set[int] = set()  # id(link) of upstreams whose SETTINGS came

    def _pump_up(self, stream: _Stream) -> None:
        if stream.up is not None:
            self._pump(stream.to_up, stream.up, stream.up_id, self.down, stream.down_id)

    def _pump_down(self, stream: _Stream) -> None:
        if stream.up is not None:
            done = self._pump(stream.to_down, self.down, stream.down_id, stream.up, stream.up_id)
            if done:
                self._forget(stream)

    def _pump(self, queue: collections.deque, to: h2.connection.H2Connection, to_id: int,
              source: h2.connection.H2Connection, source_id: int) -> bool:
        """Send what the window allows; True once the stream's end went."""
        while queue:
            item = queue[0]
            if item is None:
                queue.popleft()
                self._quiet(lambda: to.end_stream(to_id))
                return True
            if item[0] == "trailers":
                queue.popleft()
                self._quiet(lambda: to.send_headers(to_id, item[1], end_stream=True))
                return True
            data, flow = item
            room = min(to.local_flow_control_window(to_id), to.max_outbound_frame_size) if data else 0
            if data and room <= 0:
                return False
            piece = data[:room] if data else data
            self._quiet(lambda: to.send_data(to_id, piece))
            if len(piece) < len(data):
                queue[0] = (data[len(piece):], flow - len(piece))
                flow = len(piece)
            else:
                queue.popleft()
            if flow:
                self._quiet(lambda: source.acknowledge_received_data(flow, source_id))
        return False

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.down_id, None)
        if stream.link is not None:
            self.by_up.pop((id(stream.link), stream.up_id), None)
            self._admit(stream.link)

    def _room(self, link: Link) -> bool:
        up = self._up(link)
        return id(link) in self.settled and up.open_outbound_streams < up.remote_settings.max_concurrent_streams

    def _admit(self, link: Link) -> None:
        """Start the streams waiting for `link` that its server's limit now allows."""
        queue = self.waiting.get(id(link))
        while queue and self._room(link):
            stream, start = queue.popleft()
            if self.streams.get(stream.down_id) is stream:  # not reset by the client meanwhile
                start(link)

    @staticmethod
    def _quiet(action: Callable[[], object]) -> None:
        """A stream the other side already closed or reset: nothing left to relay on it."""
        try:
            action()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError) as e:
            log.debug("steal proxy: HTTP/2 stream: %r", e)

    def upgraded(self, link: Link, settings: bytes) -> bool:
        """h2c through `Upgrade` (RFC 7540 §3.2): the client's request went to `link` as HTTP/1.1,
        with `settings` (its HTTP2-Settings), and that server switched. Stream 1 is that request,
        its response coming from `link`; later streams are routed as with prior knowledge.
        False if `settings` is not a SETTINGS payload (the connection is then relayed raw)."""
        try:
            values = hyperframe.frame.SettingsFrame(0)
            values.parse_body(memoryview(base64.urlsafe_b64decode(settings)))
            # The server took the client's settings as ours: we declare the same ones.
            ours = h2.settings.Settings(client=True, initial_values=dict(values.settings))
            down = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
            down.initiate_upgrade_connection(settings)
        except (ValueError, binascii.Error, hyperframe.exceptions.HyperframeError, h2.exceptions.H2Error) as e:
            log.debug("steal proxy: h2c upgrade with bad HTTP2-Settings: %r", e)
            return False
        self.down = down
        up = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        up.local_settings = ours
        up.max_inbound_frame_size = up.incoming_buffer.max_frame_size = ours.max_frame_size
        up.decoder.max_allowed_table_size = ours.header_table_size
        up.initiate_upgrade_connection()
        if ours.enable_push:
            up.update_settings(_NO_PUSH)
        self.ups[id(link)] = (link, up)
        stream = self.streams[1] = _Stream(1)
        stream.link, stream.up, stream.up_id, stream.ended = link, up, 1, True
        self.by_up[(id(link), 1)] = stream
        self._flush_all()
        return True

    def _flush_all(self) -> None:
        if data := self.down.data_to_send():
            self.client.write(data)
        for link, up in self.ups.values():
            if data := up.data_to_send():
                link.write(data)


class H2Router(_Relay):
    """The HTTP/2 side of one client connection (http1.HttpProxy hands it over)."""

    def __init__(self, client: asyncio.Transport, choose: Chooser, pod: object,
                 use: Callable[[object, Callable[[Link], None]], None], request_head: Callable[..., object],
                 counters: collections.Counter, end: Callable[[str], None]) -> None:
        super().__init__(client)
        self.choose, self.pod, self.use = choose, pod, use
        self.request_head, self.counters, self.end = request_head, counters, end

    def client_data(self, data: bytes) -> None:
        try:
            events = self.down.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._flush_all()
            return self.end(f"HTTP/2 client: {e}")
        for event in events:
            self._down_event(event)
        self._flush_all()

    def _down_event(self, event: object) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, (h2.events.DataReceived, h2.events.StreamEnded, h2.events.TrailersReceived)):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            if isinstance(event, h2.events.DataReceived):
                stream.to_up.append((event.data, event.flow_controlled_length))
            elif isinstance(event, h2.events.TrailersReceived):
                stream.to_up.append(("trailers", event.headers))
                stream.ended = True
            elif not stream.ended:  # h2 also says so on the event that ended it
                stream.to_up.append(None)
                stream.ended = True
            self._pump_up(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None and stream.up is not None:
                self._quiet(lambda: stream.up.reset_stream(stream.up_id, event.error_code))
                self._forget(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream in ([self.streams[event.stream_id]] if event.stream_id in self.streams else
                           list(self.streams.values())):
                self._pump_down(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.end("HTTP/2 client said goodbye")

    def _request(self, event: h2.events.RequestReceived) -> None:
        pseudo = {n: v for n, v in event.headers if n.startswith(b":")}
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers if not n.startswith(b":")]
        if b":authority" in pseudo and not any(n == "host" for n, _ in headers):
            headers.append(("host", pseudo[b":authority"].decode("latin-1")))
        path = pseudo.get(b":path", b"/").decode("latin-1")
        head = self.request_head(pseudo.get(b":method", b"GET").decode("latin-1"), path, headers)
        opener = self.choose(head)
        self.counters["steal_h2_streams_local" if opener is not None else "steal_h2_streams_pod"] += 1
        stream = self.streams[event.stream_id] = _Stream(event.stream_id)
        if event.stream_ended is not None:
            stream.to_up.append(None)
            stream.ended = True

        def start(link: Link) -> None:
            if not self._room(link):
                self.waiting.setdefault(id(link), collections.deque()).append((stream, start))
                return self._flush_all()  # a new link's preface: its server may wait for it to say SETTINGS
            up = self._up(link)
            stream.link, stream.up, stream.up_id = link, up, up.get_next_available_stream_id()
            self.by_up[(id(link), stream.up_id)] = stream
            end = bool(stream.to_up) and stream.to_up[0] is None
            if end:
                stream.to_up.popleft()
            try:
                up.send_headers(stream.up_id, event.headers, end_stream=end)
            except h2.exceptions.ProtocolError as e:  # e.g. past the upstream's concurrent streams
                log.debug("steal proxy: HTTP/2 stream refused upstream: %r", e)
                self._forget(stream)
                self._quiet(lambda: self.down.reset_stream(stream.down_id, h2.errors.ErrorCodes.REFUSED_STREAM))
            else:
                self._pump_up(stream)
            self._flush_all()
        self.use(opener or self.pod, start)

    # ------------------------------------------------------------------ upstream side
    def _up(self, link: Link) -> h2.connection.H2Connection:
        """`link`'s HTTP/2 client connection, made on first use."""
        if id(link) not in self.ups:
            up = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            up.local_settings = h2.settings.Settings(client=True, initial_values=_NO_PUSH)
            up.initiate_connection()
            self.ups[id(link)] = (link, up)
        return self.ups[id(link)][1]

    def upstream_data(self, link: Link, data: bytes) -> None:
        up = self._up(link)  # its server's SETTINGS may come before the opener's caller resumed
        try:
            events = up.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.debug("steal proxy: HTTP/2 upstream: %s", e)
            return self.upstream_lost(link)
        for event in events:
            self._up_event(link, up, event)
        self._flush_all()

    def _up_event(self, link: Link, up: h2.connection.H2Connection, event: object) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            link.reusable = False  # GOAWAY: its streams finish, new ones get a new connection
            return
        stream = self.by_up.get((id(link), getattr(event, "stream_id", 0) or 0))
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled.add(id(link))
            self._admit(link)
        elif isinstance(event, h2.events.WindowUpdated):
            for s in ([stream] if stream else [s for s in self.streams.values() if s.link is link]):
                self._pump_up(s)
        elif isinstance(event, h2.events.PushedStreamReceived):  # refused, as _NO_PUSH said
            self._quiet(lambda: up.reset_stream(event.pushed_stream_id, h2.errors.ErrorCodes.REFUSED_STREAM))
        elif stream is None:
            if isinstance(event, h2.events.DataReceived):  # a stream we let go: its bytes must not hold the window
                self._quiet(lambda: up.acknowledge_received_data(event.flow_controlled_length, event.stream_id))
            return
        elif isinstance(event, h2.events.ResponseReceived):
            self._quiet(lambda: self.down.send_headers(stream.down_id, event.headers))
        elif isinstance(event, h2.events.InformationalResponseReceived):
            self._quiet(lambda: self.down.send_headers(stream.down_id, event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream.to_down.append((event.data, event.flow_controlled_length))
            self._pump_down(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream.to_down.append(("trailers", event.headers))
            self._pump_down(stream)
        elif isinstance(event, h2.events.StreamEnded):
            if not stream.to_down or stream.to_down[-1] is None or stream.to_down[-1][0] != "trailers":
                stream.to_down.append(None)
            self._pump_down(stream)
        elif isinstance(event, h2.events.StreamReset):
            self._forget(stream)
            self._quiet(lambda: self.down.reset_stream(stream.down_id, event.error_code))

    def upstream_lost(self, link: Link) -> None:
        self.ups.pop(id(link), None)
        self.settled.discard(id(link))
        for stream, _ in self.waiting.pop(id(link), ()):
            self.streams.pop(stream.down_id, None)
            self._quiet(lambda: self.down.reset_stream(stream.down_id, h2.errors.ErrorCodes.REFUSED_STREAM))
        for stream in [s for s in self.streams.values() if s.link is link]:
            self._forget(stream)
            self._quiet(lambda: self.down.reset_stream(stream.down_id, h2.errors.ErrorCodes.REFUSED_STREAM))
        self._flush_all()
