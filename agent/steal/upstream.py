"""The steal proxy's upstream side: one connection to the pod's server or to a session's
program (`Link`), and the relay of one response from it to the client (`Response`).

Owns: one upstream connection (`Link`) and the relay of one response (`Response`).
May touch: that connection's transport and the client's, to write the response on.

Both are plain asyncio protocols driven by callbacks, with no task and no await per
request: bytes are written on as they arrive, framed by framing.py (a count, a chunk scan)
without Python per byte. The client side (http1.HttpProxy) owns the links and
decides what a finished response means for the connection.
"""
from __future__ import annotations

import asyncio
from typing import Protocol

from mirrord_tun.agent.steal import framing


class Owner(Protocol):
    """What a Link reports to (http1.HttpProxy)."""

    def upstream_data(self, link: "Link", data: bytes) -> None: ...
    def upstream_eof(self, link: "Link") -> None: ...
    def upstream_lost(self, link: "Link") -> None: ...
    def pause_client(self, why: str) -> None: ...
    def resume_client(self, why: str) -> None: ...


class Link(asyncio.Protocol):
    """One upstream connection; `key`: the opener it came from."""

    def __init__(self, owner: Owner, key: object) -> None:
        self.owner, self.key = owner, key
        self.transport: asyncio.Transport | None = None
        self.eof = False  # the upstream half-closed
        self.reusable = True  # False once a response left it out of step or said close
        self.reused = False  # it finished a response and stayed open for the next request
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.owner.upstream_data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.owner.upstream_eof(self)
        return True  # our side may still be writing (a half-closed byte stream)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.owner.upstream_lost(self)

    def pause_writing(self) -> None:
        self.owner.pause_client(f"link {id(self)}")

    def resume_writing(self) -> None:
        self.owner.resume_client(f"link {id(self)}")

    def idle(self) -> bool:
        return self.transport is not None and not (self.lost or self.eof or self.transport.is_closing()) \
            and self.reusable

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Response:
    """Relays the response to one request from `link` to `client`, as the bytes come.

    `feed` returns None while the response goes on, else how it ended: SWITCHED (the
    connection is now a byte stream), KEEP (the link may carry the next request) or
    DONE (it may not). Raises framing.Malformed for a response that cannot be framed;
    `started` then says whether the client already got part of it.
    """

    SWITCHED, KEEP, DONE = "switched", "keep", "done"

    def __init__(self, request: framing.Head, client: asyncio.Transport) -> None:
        self.request, self.client = request, client
        self.buf = bytearray()  # a head not yet complete
        self.body: Body | None = None
        self.head: framing.Head | None = None
        self.started = False
        self.head_bytes = self.rest = b""  # after SWITCHED: the switching head, and the bytes after it

    def feed(self, data: bytes) -> str | None:
        if self.body is None:
            return self._head(data)
        return self._body(data, 0)

    def _head(self, data: bytes) -> str | None:
        if not self.buf:
            head = framing.plain_response(data)  # the common case: a whole plain head in one read
            if head is not None and head.status >= 200 and not _switches(self.request, head):
                return self._begin(head, data)
        self.buf += data
        while True:
            head = framing.response_head(self.buf)
            if head is None:
                return None
            self.started = True
            if _switches(self.request, head):
                # The switched head goes on now; what followed it (the new protocol's first bytes)
                # is the owner's: relayed raw, or read by the HTTP/2 router after an h2c upgrade.
                self.client.write(bytes(self.buf[:head.size]))
                self.head, self.head_bytes, self.rest = head, bytes(self.buf[:head.size]), bytes(self.buf[head.size:])
                return self.SWITCHED
            if head.status >= 200:
                break
            self.client.write(bytes(self.buf[:head.size]))  # a 1xx: the final response follows
            del self.buf[:head.size]
        data, self.buf = bytes(self.buf), bytearray()
        return self._begin(head, data)

    def _begin(self, head: framing.Head, data: bytes) -> str | None:
        """The final response's head is at the start of `data`: relay it and what follows."""
        self.started, self.head = True, head
        length = framing.NO_BODY if self.request.method == "HEAD" else head.length
        if length >= framing.NO_BODY and len(data) == head.size + max(length, 0):  # all of it, no more: no Body
            self.client.write(data)
            return self.KEEP if head.keep_alive else self.DONE
        self.body = Body(length)
        return self._body(data, head.size)

    def _body(self, data: bytes, start: int) -> str | None:
        assert self.body is not None and self.head is not None
        end = self.body.end(data, start)
        if end < 0:
            self.client.write(data)
            return None
        self.client.write(data if end == len(data) else data[:end])
        # Bytes past the response's end: the upstream is out of step, never reused.
        return self.KEEP if end == len(data) and self.head.keep_alive else self.DONE

    def until_close(self) -> bool:
        """The response ends when the upstream closes (and so ends well then)."""
        return self.body is not None and self.body.length == framing.UNTIL_CLOSE


class Body:
    """Where one message's body ends in the bytes that follow its head, across reads."""

    def __init__(self, length: int) -> None:
        self.length = framing.NO_BODY if length == 0 else length
        self._left = length
        self._chunked = framing.Chunked() if length == framing.CHUNKED else None

    def end(self, data: bytes | bytearray, start: int) -> int:
        """The offset in `data` just past the body, or -1 if all of data[start:] is body."""
        if self._chunked is not None:
            return self._chunked.feed(data, start)
        if self.length == framing.NO_BODY:
            return start
        if self.length == framing.UNTIL_CLOSE:
            return -1
        if self._left <= len(data) - start:
            end, self._left = start + self._left, 0
            return end
        self._left -= len(data) - start
        return -1


def _switches(request: framing.Head, response: framing.Head) -> bool:
    """The response switches the connection to another protocol (RFC 9110 §15.2.2, §9.3.6).

    Any 101 does: the server switches right after it whether or not the request said
    `Connection: upgrade` (a lax server upgrades on `Upgrade:` alone). Taken for an interim
    response, it left the proxy waiting for a final one that never comes."""
    if request.method == "CONNECT":
        return 200 <= response.status < 300
    return response.status == 101
