"""Filtered steal: route each HTTP/1.x request of one client connection to the
local program or to the pod's own server.

`proxy_connection` serves one accepted connection. Every request head is parsed
by http1.HeadReader (llhttp, strict: RFC 9112's smuggling vectors are answered
400 and never forwarded); `choose(head)` names the upstream; the request's raw
bytes are forwarded unchanged, its body framed by count or chunk scan (http1),
so whatever follows is the next pipelined request. HTTP/1.0 and 1.1 are routed
alike; keep-alive follows the client's and the server's words (1.0's
`Connection: keep-alive` included).

Requests are served one at a time, in order (a pipelined request waits for the
previous response), so an upstream never holds two outstanding requests and
every byte it sends until its response ends belongs to that response: responses
are relayed chunk by chunk as read, framed from their head and their request
(HEAD, 1xx, 204/304, chunked, read-until-close); a 101 to an Upgrade or a 2xx
to CONNECT switches the protocol, after which both sockets are spliced as raw
byte streams.

What cannot be routed goes to the pod untouched, bytes already read included:
a connection whose first bytes cannot start an HTTP/1.x request, a request line
that is not HTTP/1.0 or 1.1 or has a method llhttp does not know (also after
good requests: the rest of the connection is the pod's), the HTTP/2 prior-
knowledge preface, and a client that sends nothing within `sniff_timeout`
(server-speaks-first protocols). A request head must arrive whole within
`head_timeout` of its first byte (else 408).

Upstreams are keyed by the Opener object `choose` returns: one connection per
Opener per client connection, reused while it stays open, reopened after it
closes. Errors end the client connection quietly (400 for a malformed request,
502 when the upstream cannot be opened or fails before its response began); no
traceback is logged at default level.

Limits: pipelined requests are not overlapped; a client that goes away while
its request waits for the response is noticed when the response comes, as a
server would; give client StreamReaders `limit=CHUNK`.
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

from mirrord_tun.agent import http1

log = logging.getLogger("mirrord-ns.agent")

CHUNK = 256 * 1024
SNIFF_TIMEOUT = 10.0
HEAD_TIMEOUT = 10.0  # for a whole request head, from its first byte
CLOSE_TIMEOUT = 5.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n"
# A request line starts with a method token and a space; anything else (a TLS
# ClientHello, a binary protocol) is not HTTP/1.x and must not wait for a CRLF.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?: |\Z)")

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Opener = Callable[[], Awaitable[tuple[Reader, Writer]]]


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    path: str  # the target's path, query excluded, not percent-decoded
    headers: list[tuple[str, str]]  # as the client spelled the names
    path_query: str = ""  # the path and, when there is one, "?" and the query


Chooser = Callable[[RequestHead], "Opener | None"]  # None: the pod's own server


class _End(Exception):
    """The client connection ends here; the reason is logged at debug level."""


async def proxy_connection(client: tuple[Reader, Writer], choose: Chooser, pod: Opener,
                           counters: collections.Counter, *, sniff_timeout: float = SNIFF_TIMEOUT,
                           head_timeout: float = HEAD_TIMEOUT) -> None:
    proxy = _Proxy(client, choose, pod, counters, head_timeout)
    try:
        await proxy.serve(sniff_timeout)
    except http1.Malformed as e:  # a body going bad once part of it went up: both connections end
        counters["steal_bad_requests"] += 1
        log.debug("steal proxy: connection ended: %r", e)
    except (_End, OSError, EOFError) as e:
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
                 counters: collections.Counter, head_timeout: float) -> None:
        self.reader, self.writer = client
        self.choose, self.pod, self.counters, self.head_timeout = choose, pod, counters, head_timeout
        self.upstreams: dict[Opener, _Upstream] = {}
        # Read from the client, not yet forwarded: the start of the next request, or the
        # rest of the current one's body.
        self.buf = bytearray()

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
        self.buf += first
        while await self._request():
            pass

    async def _read_head(self) -> http1.Head | None:
        """The next request's head (its bytes stay in buf); None when the client closed first."""
        reader = http1.HeadReader(request=True)
        if not self.buf:
            if not await self._read_client():
                return None
        async with asyncio.timeout(self.head_timeout):
            while (head := reader.feed(self.buf)) is None:
                if not await self._read_client():
                    return None
        return head

    async def _read_client(self) -> int:
        data = await self.reader.read(CHUNK)
        self.buf += data
        return len(data)

    async def _request(self) -> bool:
        """Serve the next request; False when the client connection is done."""
        try:
            head = await self._read_head()
        except http1.NotHttp1:
            h2 = self.buf.startswith(H2_PREFACE)
            await self._passthrough(bytes(self.buf), "steal_http2" if h2 else "steal_passthrough")
            return False
        except http1.Malformed as e:
            self.counters["steal_bad_requests"] += 1
            await self._reply(400, "Bad Request")
            raise _End(f"malformed request: {e}") from None
        except TimeoutError:
            self.counters["steal_head_timeouts"] += 1
            await self._reply(408, "Request Timeout")
            raise _End("request head too slow") from None
        if head is None:
            return False
        opener = self.choose(_request_head(head))
        self.counters["steal_requests_local" if opener is not None else "steal_requests_pod"] += 1
        up = await self._upstream(opener or self.pod)
        body = _Body(http1.NO_BODY if head.length == 0 else head.length)
        # Forward the head (and the body bytes already here) before reading more:
        # with `Expect: 100-continue` the client waits for the upstream.
        try:
            done = await self._forward(body, up, head.size)
        except http1.Malformed as e:  # in the body bytes that came with the head: nothing went up
            self.counters["steal_bad_requests"] += 1
            await self._reply(400, "Bad Request")
            raise _End(f"malformed request body: {e}") from None
        if done:  # the common case, and no task to pay for
            switched, keep = await self._relay_response(head, up)
        else:
            switched, keep = await self._both(asyncio.create_task(self._forward_body(body, up)),
                                              asyncio.create_task(self._relay_response(head, up)))
        if switched:
            self.counters["steal_upgrades"] += 1
            await _splice(self.reader, self.writer, up.reader, up.writer, bytes(self.buf))
            return False
        if not keep:
            await self._drop(opener or self.pod)
        return keep and head.keep_alive

    async def _forward(self, body: "_Body", up: _Upstream, start: int = 0) -> bool:
        """Write buf's bytes of the current request (its head first, `start` bytes) upstream,
        as the client sent them; True once the request ended."""
        end = body.end(self.buf, start)
        cut = len(self.buf) if end < 0 else end
        if cut:
            up.writer.write(bytes(self.buf[:cut]))
            del self.buf[:cut]
            await up.writer.drain()
        return end >= 0

    async def _forward_body(self, body: "_Body", up: _Upstream) -> None:
        while True:
            if not await self._read_client():
                raise _End("client closed in a request body")
            if await self._forward(body, up):
                return

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

    async def _relay_response(self, request: http1.Head, up: _Upstream) -> tuple[bool, bool]:
        """Relay one response (with any 1xx before it) to the client, as read.
        Returns (protocol switched, both connections may be kept)."""
        buf = bytearray()
        while True:
            reader = http1.HeadReader(request=False)
            try:
                while (head := reader.feed(buf)) is None:
                    data = await up.reader.read(CHUNK)
                    if not data:
                        raise http1.Malformed("closed before responding")
                    buf += data
            except (http1.Malformed, http1.NotHttp1, ConnectionError) as e:
                self.counters["steal_bad_gateway"] += 1
                await self._reply(502, "Bad Gateway")
                raise _End(f"upstream response: {e!r}") from None
            if _switches(request, head):
                self.writer.write(bytes(buf))
                await self.writer.drain()
                return True, False
            if head.status >= 200:
                break
            self.writer.write(bytes(buf[:head.size]))  # a 1xx: the final response follows
            del buf[:head.size]
        length = http1.NO_BODY if request.method == "HEAD" else head.length
        return False, await self._relay_body(_Body(length), up, buf, head) and head.keep_alive

    async def _relay_body(self, body: "_Body", up: _Upstream, buf: bytearray, head: http1.Head) -> bool:
        """Relay the response from buf (its head, `head.size` bytes) to its end; whether the
        upstream's next bytes would be a next response's."""
        start = head.size
        while True:
            end = body.end(buf, start)
            self.writer.write(bytes(buf) if end < 0 or end == len(buf) else bytes(buf[:end]))
            await self.writer.drain()
            if end >= 0:
                return end == len(buf)  # extra bytes: the upstream is out of step
            buf = bytearray(await up.reader.read(CHUNK))
            start = 0
            if not buf:
                if body.length == http1.UNTIL_CLOSE:
                    return False
                raise _End("upstream closed in a response body")

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
        """The rest of the connection, `already` first, to the pod untouched (its upstream
        connection if one is open and idle)."""
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


class _Body:
    """Where one message's body ends in the bytes that follow its head, across reads."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._left = length
        self._chunked = http1.Chunked() if length == http1.CHUNKED else None

    def end(self, data: bytes | bytearray, start: int) -> int:
        """The offset in `data` just past the body, or -1 if all of data[start:] is body."""
        if self._chunked is not None:
            return self._chunked.feed(data, start)
        if self.length == http1.NO_BODY:
            return start
        if self.length == http1.UNTIL_CLOSE:
            return -1
        if self._left <= len(data) - start:
            end, self._left = start + self._left, 0
            return end
        self._left -= len(data) - start
        return -1


def _switches(request: http1.Head, response: http1.Head) -> bool:
    """The response switches the connection to another protocol (RFC 9110 §15.2.2, §9.3.6)."""
    if request.method == "CONNECT":
        return 200 <= response.status < 300
    return response.status == 101 and "upgrade" in request.tokens("connection")


def _request_head(head: http1.Head) -> RequestHead:
    target = head.target
    if target.startswith("/"):
        path, path_query = target.partition("?")[0], target
    elif target == "*" or head.method == "CONNECT":
        path = path_query = target
    else:  # absolute-form, as sent to proxies
        parts = urlsplit(target)
        path, path_query = parts.path, parts.path + (f"?{parts.query}" if parts.query else "")
    return RequestHead(head.method, target, path, head.headers, path_query)


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
