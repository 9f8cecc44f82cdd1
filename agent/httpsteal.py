"""Filtered steal: route each HTTP/1.1 request of one client connection to the
local program or to the pod's own server.

`proxy_connection` serves one accepted connection. Every request head is parsed
with h11 (a fresh `h11.Connection` per request, so the parser never needs our
responses to advance); `choose(head)` names the upstream; the request's raw
bytes are forwarded unchanged. h11 decodes bodies for us but also reports what it
has not consumed yet (`trailing_data`), which marks where a message ends: the
bytes up to there are written to the upstream as they arrived, never
re-serialized, and whatever follows is the next pipelined request.
httptools (llhttp) parses a head ~25x faster (0.6 against 16 us; scripts/
bench_httpsteal.py), but cannot say where in the bytes fed a message ended (its
pause is not exposed) nor that a response answers HEAD; h11 costs ~56 us per
request, the proxy as a whole adds ~0.11 ms (keep-alive) to 0.35 ms (new
connection) at p50 and relays bodies at >3 Gbit/s on a 2-core machine.

Requests are served one at a time, in order (a pipelined request waits for the
previous response), so an upstream never holds two outstanding requests and
every byte it sends until its response ends belongs to that response: responses
are relayed chunk by chunk as read, and a second h11 connection (in the client
role, told the method by a body-less "shadow" copy of the request) says only
where the response ends (HEAD, 1xx, 204/304, chunked, read-until-close) and
whether the protocol switched (101 to an Upgrade, 2xx to CONNECT), after which
both sockets are spliced as raw byte streams.

A connection whose first bytes cannot start an HTTP/1.x request, one h11 rejects
before its first request, the HTTP/2 prior-knowledge preface, and a client that
sends nothing within `sniff_timeout` (server-speaks-first protocols) are spliced
to the pod untouched, bytes already read included.

Upstreams are keyed by the Opener object `choose` returns: one connection per
Opener per client connection, reused while it stays open, reopened after it
closes. Errors end the client connection quietly (400 for a malformed request,
502 when the upstream cannot be opened or fails before its response began); no
traceback is logged at default level.

Limits: pipelined requests are not overlapped; a request h11 rejects after the
first one gets a 400 even if the pod's server would have taken it; a client
that goes away while its request waits for the response is noticed when the
response comes, as a server would; give client StreamReaders `limit=CHUNK`.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import h11

log = logging.getLogger("mirrord-ns.agent")

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
SNIFF_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n"
# A request line starts with a method token and a space; anything else (a TLS
# ClientHello, a binary protocol) is not HTTP/1.x and must not wait for a CRLF.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?: |\Z)")
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Opener = Callable[[], Awaitable[tuple[Reader, Writer]]]


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    path: str  # the target's path, query excluded, not percent-decoded
    headers: list[tuple[str, str]]  # as the client spelled the names


Chooser = Callable[[RequestHead], "Opener | None"]  # None: the pod's own server


@dataclass(frozen=True)
class HttpFilter:
    """A request matches when every given regex finds a match (re.search):
    `header` in some `Name: value` line, case-insensitively; `path` in the
    path, case-sensitively. A filter with neither matches every request."""

    header: re.Pattern[str] | None
    path: re.Pattern[str] | None

    def matches(self, head: RequestHead) -> bool:
        if self.path is not None and not self.path.search(head.path):
            return False
        return self.header is None or any(self.header.search(f"{n}: {v}") for n, v in head.headers)

    @classmethod
    def compile(cls, header: str | None, path: str | None) -> "HttpFilter":
        return cls(_compile("--http-header-filter", header, re.IGNORECASE), _compile("--http-path-filter", path, 0))


def _compile(option: str, pattern: str | None, flags: int) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, flags)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999} overflows
        raise ValueError(f"{option} {pattern!r} is not a valid regex: {e}".replace("\n", " ")) from None


class _End(Exception):
    """The client connection ends here; the reason is logged at debug level."""


async def proxy_connection(client: tuple[Reader, Writer], choose: Chooser, pod: Opener,
                           counters: collections.Counter, *, sniff_timeout: float = SNIFF_TIMEOUT) -> None:
    proxy = _Proxy(client, choose, pod, counters)
    try:
        await proxy.serve(sniff_timeout)
    except (_End, OSError, EOFError, h11.ProtocolError) as e:
        log.debug("steal proxy: connection ended: %r", e)
    except Exception as e:  # a bug must not take the agent down nor print a traceback
        counters["steal_errors"] += 1
        log.warning("steal proxy: connection failed: %s", e)
        log.debug("steal proxy: connection failed", exc_info=True)
    finally:
        await proxy.close()


class _Upstream:
    def __init__(self, reader: Reader, writer: Writer) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())


class _Proxy:
    def __init__(self, client: tuple[Reader, Writer], choose: Chooser, pod: Opener,
                 counters: collections.Counter) -> None:
        self.reader, self.writer = client
        self.choose, self.pod, self.counters = choose, pod, counters
        self.upstreams: dict[Opener, _Upstream] = {}
        # Read from the client and fed to the current request's parser, not yet
        # forwarded; between requests, the start of the next one.
        self.window = b""

    async def serve(self, sniff_timeout: float) -> None:
        try:
            async with asyncio.timeout(sniff_timeout):
                first = await self.reader.read(CHUNK)
        except TimeoutError:
            first = None
        if first == b"":
            return
        if first is None or not _METHOD_PREFIX.match(first):
            return await self._passthrough(first or b"", "steal_passthrough")
        self.window = first
        served = 0
        while await self._request(served):
            served += 1

    async def _request(self, served: int) -> bool:
        """Serve the next request; False when the client connection is done."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if self.window:  # b"" would tell h11 the client closed
            parser.receive_data(self.window)
        try:
            event = await self._next_event(parser)
            if served == 0 and isinstance(event, h11.Request) and event.method == b"PRI":
                raise h11.RemoteProtocolError("HTTP/2 prior knowledge")
        except h11.RemoteProtocolError as e:
            if served == 0:
                kind = "steal_http2" if self.window.startswith(H2_PREFACE) else "steal_passthrough"
                await self._passthrough(self.window, kind)
                return False
            self.counters["steal_bad_requests"] += 1
            await self._reply(400, "Bad Request")
            raise _End(f"malformed request: {e}") from None
        if isinstance(event, h11.ConnectionClosed):
            return False
        if not isinstance(event, h11.Request):
            raise _End(f"unexpected {event!r}")

        head = _request_head(event)
        opener = self.choose(head)
        self.counters["steal_requests_local" if opener is not None else "steal_requests_pod"] += 1
        up = await self._upstream(opener or self.pod)
        # Forward the head (and any body bytes already here) before reading
        # more: with `Expect: 100-continue` the client waits for the upstream.
        done = self._pending_events(parser)
        await self._forward_consumed(parser, up)
        if done:  # the common case, and no task to pay for
            switched, keep = await self._relay_response(event, up)
        else:
            switched, keep = await self._both(asyncio.create_task(self._forward_body(parser, up)),
                                              asyncio.create_task(self._relay_response(event, up)))
        if switched:
            self.counters["steal_upgrades"] += 1
            await _splice(self.reader, self.writer, up.reader, up.writer, self.window)
            return False
        if not keep:
            await self._drop(opener or self.pod)
        # An Upgrade refused by the upstream leaves h11 in MIGHT_SWITCH_PROTOCOL: still HTTP.
        return keep and parser.their_state is not h11.MUST_CLOSE

    async def _both(self, body: asyncio.Task[None], response: asyncio.Task[tuple[bool, bool]]) -> tuple[bool, bool]:
        """Wait for the request body and the response; a response may end first
        (an early error reply) but a failing side ends both."""
        pending = {body, response}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raises the side's failure
                if response in done and not response.result()[1]:
                    break  # the upstream closes: the rest of the body has nowhere to go
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        switched, keep = response.result()
        return switched, keep and not body.cancelled()

    async def _read(self, parser: h11.Connection) -> None:
        data = await self.reader.read(CHUNK)
        # Usually the window was emptied by the last forward: no copy.
        self.window = self.window + data if self.window else data
        parser.receive_data(data)

    async def _next_event(self, parser: h11.Connection) -> object:
        while (event := parser.next_event()) is h11.NEED_DATA:
            await self._read(parser)
        return event

    @staticmethod
    def _pending_events(parser: h11.Connection) -> bool:
        """Take the events the buffered bytes complete; True once the message ended."""
        while type(event := parser.next_event()) is h11.Data:
            pass
        return event is not h11.NEED_DATA  # EndOfMessage

    async def _forward_consumed(self, parser: h11.Connection, up: _Upstream) -> None:
        """Write what the parser consumed, as the client sent it."""
        n = len(self.window) - len(parser.trailing_data[0])
        if n:
            up.writer.write(self.window[:n] if n < len(self.window) else self.window)
            self.window = self.window[n:]
            await up.writer.drain()

    async def _forward_body(self, parser: h11.Connection, up: _Upstream) -> None:
        while True:
            await self._read(parser)
            done = self._pending_events(parser)
            await self._forward_consumed(parser, up)
            if done:
                return

    async def _relay_response(self, request: h11.Request, up: _Upstream) -> tuple[bool, bool]:
        """Relay one response (with any 1xx before it) to the client, as read.
        Returns (protocol switched, both connections may be kept)."""
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=request.method, target=request.target, http_version=request.http_version,
                                headers=[(n, v) for n, v in request.headers if n not in _FRAMING]))
        parser.send(h11.EndOfMessage())
        held = b""  # until a first head parses, so that a garbled reply is a 502, not relayed
        started = False
        while True:
            try:
                data = await up.reader.read(CHUNK)
                parser.receive_data(data)
                outcome, heads = _response_events(parser)
            except (h11.ProtocolError, ConnectionError) as e:
                if not started:
                    self.counters["steal_bad_gateway"] += 1
                    await self._reply(502, "Bad Gateway")
                raise _End(f"upstream response: {e!r}") from None
            held = held + data if held else data
            started = started or heads
            if started and held:
                self.writer.write(held)
                held = b""
                await self.writer.drain()
            if outcome is not None:
                return outcome

    async def _upstream(self, opener: Opener, http: bool = True) -> _Upstream:
        up = self.upstreams.get(opener)
        if up is not None and up.usable():
            return up
        await self._drop(opener)
        try:
            up = _Upstream(*await opener())
        except (OSError, asyncio.TimeoutError) as e:
            self.counters["steal_bad_gateway"] += 1
            if http:
                await self._reply(502, "Bad Gateway")
            raise _End(f"cannot open upstream: {e!r}") from None
        self.upstreams[opener] = up
        return up

    async def _drop(self, opener: Opener) -> None:
        up = self.upstreams.pop(opener, None)
        if up is not None:
            await _close(up.writer)

    async def _passthrough(self, already: bytes, counter: str) -> None:
        self.counters[counter] += 1
        up = await self._upstream(self.pod, http=False)
        await _splice(self.reader, self.writer, up.reader, up.writer, already)

    async def _reply(self, status: int, reason: str) -> None:
        body = f"{status} {reason} (mirrord-ns steal)\n".encode()
        self.writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                          b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        with contextlib.suppress(OSError):
            await self.writer.drain()

    async def close(self) -> None:
        await asyncio.gather(_close(self.writer), *(_close(u.writer) for u in self.upstreams.values()))
        self.upstreams.clear()


def _response_events(parser: h11.Connection) -> tuple[tuple[bool, bool] | None, bool]:
    """Take the events of the bytes received: whether the response ended, as
    (protocol switched, connections may be kept), and whether any event came."""
    heads = False
    while (event := parser.next_event()) is not h11.NEED_DATA:
        heads = True
        if parser.their_state is h11.SWITCHED_PROTOCOL:
            return (True, False), True
        if type(event) is h11.EndOfMessage:
            return (False, parser.their_state is h11.DONE), True
        if type(event) is h11.ConnectionClosed:
            raise h11.RemoteProtocolError("closed before responding")
    return None, heads


def _request_head(event: h11.Request) -> RequestHead:
    target = event.target.decode("latin-1")
    if target.startswith("/"):
        path = target.partition("?")[0]
    elif target == "*" or event.method == b"CONNECT":
        path = target
    else:  # absolute-form, as sent to proxies
        path = urlsplit(target).path
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]
    return RequestHead(event.method.decode("latin-1"), target, path, headers)


async def _pipe(reader: Reader, writer: Writer) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()  # half-close, as the peer did


async def _splice(a_reader: Reader, a_writer: Writer, b_reader: Reader, b_writer: Writer, to_b: bytes) -> None:
    """Relay raw bytes both ways (`to_b` first, toward b) until both directions
    ended; a failing direction ends the other."""
    if to_b:
        b_writer.write(to_b)
        await b_writer.drain()
    tasks = {asyncio.create_task(_pipe(a_reader, b_writer)), asyncio.create_task(_pipe(b_reader, a_writer))}
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def _close(writer: Writer) -> None:
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()  # a peer that never reads must not hold us
    except OSError:
        pass
