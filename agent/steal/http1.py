"""Filtered steal: route each HTTP/1.x request of one client connection to the
local program or to the pod's own server.

Owns: one accepted client connection (`HttpProxy`), its HTTP/1.x requests and their order.
May touch: the client's transport and the upstream links it opens through its opener;
nothing of the kernel's. Framing is framing.py's, HTTP/2 is handed to http2.py.

`HttpProxy` is the asyncio protocol of one accepted connection. Every request head
is parsed by framing.HeadReader (llhttp, strict: RFC 9112's smuggling vectors are
answered 400 and never forwarded); `choose(head)` names the upstream; the
request's raw bytes are forwarded unchanged, its body framed by count or chunk
scan (framing), so whatever follows is the next pipelined request. HTTP/1.0 and
1.1 are routed alike; keep-alive follows the client's and the server's words
(1.0's `Connection: keep-alive` included). It is all callbacks, no task per
request: the proxy's cost is a parse per head and a write per read.

Requests are served one at a time, in order (a pipelined request waits in the
buffer for the previous response), so an upstream never holds two outstanding
requests and every byte it sends until its response ends belongs to that
response (upstream.Response frames it: HEAD, 1xx, 204/304, chunked,
read-until-close). A 101 to an Upgrade or a 2xx to CONNECT switches the
protocol: both connections then carry raw bytes, half-closes included.

What cannot be routed goes to the pod untouched, bytes already read included:
a connection whose first bytes cannot start an HTTP/1.x request, a request line
that is not HTTP/1.0 or 1.1 or has a method llhttp does not know (also after
good requests: the rest of the connection is the pod's), the HTTP/2 prior-
knowledge preface, and a client that sends nothing within `sniff_timeout`
(server-speaks-first protocols). A request head must arrive whole within
`head_timeout` of its first byte (else 408) and within framing.MAX_HEAD (else
400). Upstream connections are opened on a head's completion, one per opener
(keyed by the object `choose` returns), reused while they stay open. Reading
pauses while an upstream or the client cannot take more (asyncio's write-buffer
marks), and while a pipelined request waits: a connection holds at most one head.

Errors end the client connection quietly (400 for a malformed request, 502 when
the upstream cannot be opened or its response cannot be framed); no traceback
is logged at default level. An upstream that closes is mirrored where the client
would have seen that close without the proxy: one closed before answering a
request ends the client connection without a response (a kept-alive request
racing the server's idle timeout is what clients retry), and one that closes
its idle keep-alive connection between requests ends the client's too.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import Awaitable, Callable, NamedTuple
from urllib.parse import urlsplit

from mirrord_tun.agent.steal import framing
from mirrord_tun.agent.steal.http2 import H2Router
from mirrord_tun.agent.steal.upstream import Body, Link, Response

log = logging.getLogger("mirrord-ns.agent")

SNIFF_TIMEOUT = 10.0
HEAD_TIMEOUT = 10.0  # for a whole request head, from its first byte
H2_PREFACE = b"PRI * HTTP/2.0\r\n"
# A request line starts with a method token and a space; anything else (a TLS
# ClientHello, a binary protocol) is not HTTP/1.x and must not wait for a CRLF.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?: |\Z)")

# Opens an upstream connection with the given protocol factory (in proxy.py: a
# transparent socket from the client's address).
Opener = Callable[[Callable[[], Link]], Awaitable[asyncio.BaseTransport]]


class RequestHead(NamedTuple):
    """What the filters see of a request (a tuple: one is made per request)."""

    method: str
    target: str
    path: str  # the target's path, query excluded, not percent-decoded
    headers: list[tuple[str, str]]  # as the client spelled the names
    path_query: str = ""  # the path and, when there is one, "?" and the query


Chooser = Callable[[RequestHead], "Opener | None"]  # None: the pod's own server
# At connection_made: (choose, the pod's opener) for this client, or None to refuse it.
Setup = Callable[[asyncio.Transport], "tuple[Chooser, Opener] | None"]

# What the client side is doing.
SNIFF, HEAD, BODY, WAIT, RAW, H2, CLOSED = "sniff", "head", "body", "wait", "raw", "h2", "closed"


class _Client(asyncio.Protocol):
    """A client connection's state and plumbing: its upstream links (opened, reused, spliced
    raw), pausing, and ending; HttpProxy adds the HTTP."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    h2: H2Router
    choose: Chooser
    pod: Opener

    def __init__(self, setup: Setup, counters: collections.Counter, on_close: Callable[["HttpProxy"], None],
                 sniff_timeout: float = SNIFF_TIMEOUT, head_timeout: float = HEAD_TIMEOUT, first: bytes = b"") -> None:
        self.setup, self.counters, self.on_close, self.first = setup, counters, on_close, first
        self.sniff_timeout, self.head_timeout = sniff_timeout, head_timeout
        self.state = SNIFF
        self.buf = bytearray()  # from the client, not yet forwarded
        self.links: dict[object, Link] = {}
        self.link: Link | None = None  # the current request's upstream (or the raw stream's)
        self.response_link: Link | None = None  # the link whose bytes are self.response's
        self.request: framing.Head | None = None
        self.reader = framing.HeadReader()
        self.body: Body | None = None
        self.response: Response | None = None
        self.client_eof = False
        self.paused: set[str] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.opening: set[asyncio.Task[None]] = set()
        self.waiting: dict[object, list[Callable[[Link], None]]] = {}  # by opener: who waits for its link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        routing = self.setup(self.transport)
        if routing is None:
            self.state = CLOSED
            self.transport.abort()
            return
        self.choose, self.pod = routing
        self.timer = self.loop.call_later(self.sniff_timeout, self._passthrough, "steal_passthrough")
        if self.first:  # what a proxy worker read of it: after connection_made (uvloop resumes reading then)
            self.loop.call_soon(self.take_first)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self._cancel_timer()
        for link in self.links.values():
            link.close()
        if self.link is not None:
            self.link.close()
        self.on_close(self)

    def pause_writing(self) -> None:
        for link in self.links.values():
            if link.transport is not None:
                link.transport.pause_reading()

    def resume_writing(self) -> None:
        for link in self.links.values():
            if link.transport is not None and not link.transport.is_closing():
                link.transport.resume_reading()

    def pause_client(self, why: str) -> None:
        if not self.paused and self.state != CLOSED:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume_client(self, why: str) -> None:
        if why not in self.paused:  # the usual case, once per request: nothing to do
            return
        self.paused.discard(why)
        if not self.paused and self.state != CLOSED and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        """End this connection at once (its session left)."""
        self.transport.abort()

    def _use(self, opener: Opener, then: Callable[[Link], None]) -> None:
        """Call `then` with an open link of `opener`: the idle one, the one opening (HTTP/2
        streams arriving together share one connection, as the client's), or a new one."""
        link = self.links.get(opener)
        if link is not None and link.idle():
            return then(link)
        if opener in self.waiting:
            self.waiting[opener].append(then)
            return
        if link is not None:
            link.close()
        self.pause_client("opening")
        self.waiting[opener] = [then]
        task = self.loop.create_task(self._open(opener))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    async def _open(self, opener: Opener) -> None:
        link = Link(self, opener)
        try:
            await opener(lambda: link)
        except (OSError, asyncio.TimeoutError) as e:
            self.waiting.pop(opener, None)
            if self.state != CLOSED:
                self._refuse(502, "Bad Gateway", f"cannot open upstream: {e!r}", "steal_bad_gateway",
                             http=self.state != RAW)
            return
        waiting = self.waiting.pop(opener, [])
        if self.state == CLOSED:
            link.close()
            return
        self.links[opener] = link
        self.resume_client("opening")
        for then in waiting:
            then(link)

    def _passthrough(self, counter: str) -> None:
        """The rest of the connection, the bytes read included, to the pod untouched (its idle
        upstream connection if there is one)."""
        self._cancel_timer()
        self.counters[counter] += 1
        self.state = RAW

        def splice(link: Link) -> None:
            self.link = link
            self.links.pop(link.key, None)
            if self.buf:
                link.write(bytes(self.buf))
                self.buf.clear()
            if self.client_eof and link.transport is not None and link.transport.can_write_eof():
                link.transport.write_eof()
        self._use(self.pod, splice)

    def _raw_done(self) -> bool:
        """Both directions of a raw stream ended: close."""
        if self.client_eof and self.link is not None and self.link.eof:
            self._end("stream done")
        return True

    def _refuse(self, status: int, reason: str, why: str, counter: str = "steal_bad_requests",
                http: bool = True) -> None:
        self.counters[counter] += 1
        if http and not self.transport.is_closing():
            body = f"{status} {reason} (mirrord-ns steal)\n".encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self._end(why)

    def _end(self, why: str) -> None:
        log.debug("steal proxy: connection ended: %s", why)
        self.state = CLOSED
        self._cancel_timer()
        self.transport.close()  # after what is buffered; connection_lost closes the links

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Requests(_Client):
    """The HTTP/1 requests of a client connection: heads read, routed and forwarded with their
    bodies, one at a time; HttpProxy adds the upstreams' side."""

    def _advance(self) -> None:
        """Take the buffered client bytes as far as the state allows."""
        if self.state == HEAD and self.response is None:
            self._head()
        elif self.state == BODY:
            self._forward_body()
        if self.state == WAIT and len(self.buf) > framing.MAX_HEAD:
            self.pause_client("pipelined")  # the next request waits for this response: hold no more

    def _head(self) -> None:
        if not self.buf:
            return
        try:
            head = self.reader.feed(self.buf)
        except framing.NotHttp1:
            if self.buf.startswith(H2_PREFACE) and self.request is None:
                return self._http2()
            return self._passthrough("steal_passthrough")
        except framing.Malformed as e:
            return self._refuse(400, "Bad Request", f"malformed request: {e}")
        if head is None:
            if self.timer is None:
                self.timer = self.loop.call_later(self.head_timeout, self._head_too_slow)
            return
        self.reader = framing.HeadReader()
        self._route(head)

    def _route(self, head: framing.Head, whole: bytes | None = None) -> None:
        """A whole head, at the start of self.buf (or `whole`: the request, head and body, with
        nothing after it and nothing buffered): to its upstream."""
        if self.timer is not None:
            self._cancel_timer()
        self.request = head
        opener = self.choose(request_head(head))
        self.counters["steal_requests_local" if opener is not None else "steal_requests_pod"] += 1
        opener = opener or self.pod
        link = self.links.get(opener)
        if whole is not None and link is not None and link.idle():  # the usual keep-alive request: straight on
            self.link = self.response_link = link
            self.response = Response(head, self.transport)
            self.state = WAIT
            link.write(whole)
            return
        if whole is not None:
            self.buf += whole
        self.body = Body(head.length)
        self._use(opener, self._send_head)

    def _send_head(self, link: Link) -> None:
        assert self.request is not None
        self.link = self.response_link = link
        self.response = Response(self.request, self.transport)
        self.state = BODY
        # The head (and the body bytes already here) go now: with `Expect: 100-continue`
        # the client waits for the upstream before sending the rest.
        self._forward_body(self.request.size)
        if self.client_eof and self.state == BODY:  # it shut its side while the upstream opened
            self._end("client closed")

    def _forward_body(self, start: int = 0) -> None:
        assert self.body is not None and self.link is not None
        try:
            end = self.body.end(self.buf, start)
        except framing.Malformed as e:
            if start:  # nothing of this request went up yet: the client may still hear why
                return self._refuse(400, "Bad Request", f"malformed request body: {e}")
            self.counters["steal_bad_requests"] += 1
            return self._end(f"malformed request body: {e}")
        cut = len(self.buf) if end < 0 else end
        if cut:
            self.link.write(bytes(self.buf[:cut]))
            del self.buf[:cut]
        if end >= 0:
            self._request_sent()

    def _request_sent(self) -> None:
        self.state = WAIT
        if self.response is None:  # it already ended: the next request
            self._next()

    def _body_data(self, data: bytes) -> None:
        assert self.body is not None and self.link is not None
        try:
            end = self.body.end(data, 0)
        except framing.Malformed as e:
            self.counters["steal_bad_requests"] += 1
            return self._end(f"malformed request body: {e}")
        if end < 0:
            return self.link.write(data)
        self.link.write(data[:end])
        self.buf += data[end:]
        self._request_sent()

    def _next(self) -> None:
        """The request and its response are done: on to the next one."""
        assert self.request is not None
        if not self.request.keep_alive:
            return self._end("request not keep-alive")
        self.state, self.request, self.body = HEAD, None, None
        if self.paused:
            self.resume_client("pipelined")
        if self.buf:
            self._advance()
        elif self.client_eof:
            self._end("client done")

    def _http2(self) -> None:
        """HTTP/2 with prior knowledge: every stream routed by the filter (http2.py)."""
        self.counters["steal_http2"] += 1
        self.state = H2
        self.h2 = H2Router(self.transport, self.choose, self.pod, self._use, _h2_request_head, self.counters,
                           self._end)
        data, self.buf = bytes(self.buf), bytearray()
        self.h2.client_data(data)

    def _h2c(self, link: Link, settings: bytes, upstream_bytes: bytes) -> bool:
        """The upstream switched the client's `Upgrade: h2c` request to HTTP/2: from here each
        stream is routed by the filter (http2.py), stream 1 (the upgrade request's response)
        staying with `link`; False (relayed raw then) if the client's HTTP2-Settings are bad."""
        self.h2 = H2Router(self.transport, self.choose, self.pod, self._use, _h2_request_head, self.counters,
                           self._end)
        if not self.h2.upgraded(link, settings):
            return False
        self.counters["steal_http2"] += 1
        self.counters["steal_h2c_upgrades"] += 1
        self.state = H2
        for other in [other for other in self.links.values() if other is not link]:
            other.reusable = False  # HTTP/1 keep-alive links cannot carry HTTP/2
            other.close()
        self.links = {link.key: link}
        data, self.buf = bytes(self.buf), bytearray()
        if upstream_bytes:
            self.h2.upstream_data(link, upstream_bytes)
        if data:
            self.h2.client_data(data)
        if self.client_eof:
            self._end("client closed")
        return True

    def _head_too_slow(self) -> None:
        self.timer = None
        self._refuse(408, "Request Timeout", "request head too slow", "steal_head_timeouts")


class HttpProxy(_Requests):
    """One client connection of a filtered port."""

    def take_first(self) -> None:
        """The bytes a proxy worker read of this connection, if no read of ours came first."""
        if self.first and self.state != CLOSED:
            self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        if self.first:  # a handed-over connection: what the worker read comes before
            data, self.first = self.first + data, b""
        if self.state == H2:
            return self.h2.client_data(data)
        if self.state == BODY and not self.buf and self.link is not None:
            return self._body_data(data)  # the bulk of a large body: no copy into buf
        if self.state == RAW:
            if self.link is not None:
                self.link.write(data)
            else:
                self.buf += data
            return
        if not self.buf and self.response is None and self.state in (HEAD, SNIFF):
            head = framing.plain_request(data)  # the common case, without llhttp's callbacks
            if head is not None:
                self.state = HEAD
                if len(data) == head.size + max(head.length, 0):
                    return self._route(head, data)
                self.buf += data
                return self._route(head)
        self.buf += data
        if self.state == SNIFF:
            self._cancel_timer()
            if not _METHOD_PREFIX.match(self.buf):
                return self._passthrough("steal_passthrough")
            self.state = HEAD
        self._advance()

    def eof_received(self) -> bool:
        self.take_first()  # a handed-over connection's EOF may come before its worker's bytes
        self.client_eof = True
        if self.state == RAW:
            if self.link is not None and self.link.transport is not None and self.link.transport.can_write_eof():
                self.link.transport.write_eof()
            return self._raw_done()
        if self.state in (BODY, H2):
            self._end("client closed")
        elif self.state in (SNIFF, HEAD) and self.response is None and self.request is None:
            self._end("client done")  # (a request routed, its upstream still opening, goes on)
        return True  # a response may still be on its way

    # ------------------------------------------------------------------ upstream events
    def _raw_link(self, link: Link) -> bool:
        """`link` carries the raw stream (a pod link still opening for it is claimed here: its
        server may speak first, before the opener's caller resumes)."""
        if self.state == RAW and self.link is None and link.key is self.pod:
            self.link = link
        return self.state == RAW and link is self.link

    def upstream_data(self, link: Link, data: bytes) -> None:
        if self.state == H2:
            return self.h2.upstream_data(link, data)
        if self.state == RAW and self._raw_link(link):
            self.transport.write(data)
            return
        if self.response is None or link is not self.response_link:
            link.reusable = False  # bytes nobody asked for
            link.close()
            return
        try:
            outcome = self.response.feed(data)
        except framing.Malformed as e:
            return self._bad_gateway(f"upstream response: {e}")
        if outcome is not None:
            self._response_done(link, outcome)

    def upstream_eof(self, link: Link) -> None:
        if self.state == H2:
            return self.h2.upstream_lost(link)
        if self._raw_link(link):
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._raw_done()
        elif self.response is not None and link is self.response_link:
            if self.response.until_close():
                self._response_done(link, Response.DONE)
            elif not self.response.started and link.reusable:  # (not one we closed: it sent bytes unasked)
                # As without the proxy, the client sees the close: a 502 it would take for the
                # server's answer, where a close after a kept-alive request (the server's idle
                # timeout racing the request) is what clients retry.
                self.counters["steal_upstream_closed_unanswered"] += 1
                self.response = None
                self._end("upstream closed before answering")
            else:
                self._bad_gateway("upstream closed before its response ended")
        elif self.links.get(link.key) is link:
            self._idle_link_closed(link)

    def _idle_link_closed(self, link: Link) -> None:
        """An upstream closed the connection kept alive for this client's next request (an idle
        timeout): between requests the client connection closes too, as it would without the
        proxy, instead of staying open, unbounded in time, on a connection the server gave up."""
        if link.reused and self.state == HEAD and self.response is None and not self.buf:
            self.counters["steal_upstream_idle_closes"] += 1
            self._end("upstream closed an idle keep-alive connection")

    def upstream_lost(self, link: Link) -> None:
        kept = self.links.get(link.key) is link
        if kept:
            del self.links[link.key]
        self.resume_client(f"link {id(link)}")
        if self.state == H2:
            return self.h2.upstream_lost(link)
        if self.state == RAW and link is self.link:
            self._end("upstream gone")
        elif self.response is not None and link is self.response_link:
            self.upstream_eof(link)
        elif kept:
            self._idle_link_closed(link)

    def _response_done(self, link: Link, outcome: str) -> None:
        response, self.response = self.response, None
        assert response is not None
        if outcome == Response.SWITCHED:
            self.counters["steal_upgrades"] += 1
            settings = _h2c_settings(response)
            if settings is not None and self._h2c(link, settings, response.rest):
                return
            self.state = RAW
            self.links.pop(link.key, None)
            if response.rest:
                self.transport.write(response.rest)
            if self.buf:
                link.write(bytes(self.buf))
                self.buf.clear()
            if self.client_eof:  # the client finished before the switch: the upstream hears it now
                self.eof_received()
            return
        link.reused = outcome == Response.KEEP
        if outcome != Response.KEEP or response.until_close():
            link.reusable = False
            link.close()
            # A server that said close (or 1.0 without keep-alive) closes the client's connection
            # too: a pipelined request after it must not run where, without us, it never would.
            if response.until_close() or self.state == BODY or response.head is not None \
                    and not response.head.keep_alive:
                return self._end("response ended with its connection")
        if self.state == WAIT:
            self._next()

    def _bad_gateway(self, why: str) -> None:
        response, self.response = self.response, None
        if response is not None and not response.started:
            return self._refuse(502, "Bad Gateway", why, "steal_bad_gateway")
        self._end(why)



_H2C_RESPONSE = re.compile(rb"\r\nupgrade:[ \t]*h2c[ \t]*\r\n", re.IGNORECASE)


def _h2c_settings(response: Response) -> bytes | None:
    """The client's HTTP2-Settings when `response` switched its request to h2c (RFC 7540 §3.2)."""
    if response.head is None or response.head.status != 101 or not _H2C_RESPONSE.search(response.head_bytes):
        return None
    offered = settings = None
    for name, value in response.request.headers:
        if name.lower() == "upgrade":
            offered = offered or "h2c" in (t.strip().lower() for t in value.split(","))
        elif name.lower() == "http2-settings":
            settings = value.strip().encode("latin-1")
    return settings if offered else None


def _h2_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> RequestHead:
    return RequestHead(method, target, target.partition("?")[0], headers, target)


def request_head(head: framing.Head) -> RequestHead:
    target = head.target
    if target.startswith("/"):
        path, path_query = target.partition("?")[0], target
    elif target == "*" or head.method == "CONNECT":
        path = path_query = target
    else:  # absolute-form, as sent to proxies
        parts = urlsplit(target)
        path, path_query = parts.path, parts.path + (f"?{parts.query}" if parts.query else "")
    return RequestHead(head.method, target, path, head.headers, path_query)
