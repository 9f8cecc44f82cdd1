"""HTTP/1.x framing for the steal proxy: where a message head ends, what it says, and where its body ends.

Heads are parsed by llhttp (httptools) in its strict mode, fed incrementally
and never past the head's end, so the bytes after it stay ours to frame: RFC
9112's smuggling vectors are errors there (Content-Length with
Transfer-Encoding, differing or repeated Content-Length, obs-fold, a bare LF,
a Transfer-Encoding not ending in chunked). Bodies are framed here, with no
Python per byte: a Content-Length is a count, a chunked body is scanned chunk
by chunk (size lines and trailers are checked, data is skipped), and anything
else ends when the connection does. The bytes themselves are never rewritten.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import httptools

MAX_HEAD = 64 * 1024  # a head (request line and headers) above this is refused
MAX_LINE = 4096  # a chunk-size line, a trailer line
MAX_TRAILERS = 16 * 1024
# HTTP/1.x by its request line (a bare LF too: llhttp then refuses it, and it is answered 400).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ \r\n]{1,8192} HTTP/1\.[01]\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
NO_BODY, UNTIL_CLOSE, CHUNKED = -1, -2, -3  # Body.length's special values; >= 0: a Content-Length


class Malformed(Exception):
    """Not a message we may forward: a request answered 400, a response 502."""


class NotHttp1(Exception):
    """A request line that is not HTTP/1.0 or 1.1 (another protocol, or one this proxy cannot
    route): the connection goes to the pod untouched."""


@dataclass
class Head:
    """One parsed head; `size`: its bytes in the buffer it came from."""

    size: int = 0
    version: str = ""
    method: str = ""  # requests
    target: str = ""  # requests, as sent
    status: int = 0  # responses
    headers: list[tuple[str, str]] = field(default_factory=list)  # names as spelled, latin-1
    keep_alive: bool = False
    length: int = NO_BODY  # NO_BODY, UNTIL_CLOSE, CHUNKED or a Content-Length

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every `name` header, lowercased."""
        return {t.strip().lower() for n, v in self.headers if n.lower() == name for t in v.split(",")}


class _Callbacks:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((bytes(name), bytes(value)))

    def on_headers_complete(self) -> None:
        self.complete = True


class HeadReader:
    """Feed the growing buffer of one connection until a head is complete."""

    def __init__(self, request: bool) -> None:
        self._request, self._cb, self._fed = request, _Callbacks(), 0
        self._parser = (httptools.HttpRequestParser if request else httptools.HttpResponseParser)(self._cb)

    def feed(self, buf: bytes | bytearray) -> Head | None:
        """The head once `buf` (all bytes since the head began) holds all of it, else None."""
        if self._request and self._fed == 0 and b"\n" in buf[:8300]:
            if not _REQUEST_LINE.match(buf):
                raise NotHttp1("not an HTTP/1.x request line")
        end = buf.find(b"\r\n\r\n", max(0, self._fed - 3))
        stop = len(buf) if end < 0 else end + 4
        if stop > MAX_HEAD:
            raise Malformed(f"head over {MAX_HEAD} bytes")
        try:
            self._parser.feed_data(memoryview(buf)[self._fed:stop])
        except httptools.HttpParserUpgrade:
            pass  # Upgrade or CONNECT: the head is complete; whether it switches, the response says
        except httptools.HttpParserInvalidMethodError as e:
            raise NotHttp1(str(e)) from None
        except httptools.HttpParserError as e:
            raise Malformed(str(e)) from None
        self._fed = stop
        if not self._cb.complete:
            if end >= 0:
                raise Malformed("head did not end at its empty line")
            return None
        return self._head(stop)

    def _head(self, size: int) -> Head:
        head = Head(size=size, version=self._parser.get_http_version(),
                    headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._cb.headers])
        if self._request:
            head.method, head.target = self._parser.get_method().decode("latin-1"), self._cb.url.decode("latin-1")
        else:
            head.status = self._parser.get_status_code()
        if head.version not in ("1.0", "1.1"):
            raise (NotHttp1 if self._request else Malformed)(f"HTTP/{head.version}")
        connection = head.tokens("connection")
        head.keep_alive = "close" not in connection and (head.version == "1.1" or "keep-alive" in connection)
        head.length = _length(head, self._request)
        return head


def _length(head: Head, request: bool) -> int:
    """The body's framing from the head (RFC 9112 §6.3); a response's also depends on its
    request (HEAD, CONNECT), which the caller applies."""
    if not request and (head.status < 200 or head.status in (204, 304)):
        return NO_BODY
    codings = [t.strip().lower() for n, v in head.headers if n.lower() == "transfer-encoding" for t in v.split(",")]
    if codings:
        if head.version == "1.0":
            raise Malformed("Transfer-Encoding in an HTTP/1.0 message")  # §6.1: the framing is faulty
        if codings[-1] == "chunked":
            return CHUNKED
        if request:
            raise Malformed("Transfer-Encoding not ending in chunked")
        return UNTIL_CLOSE
    lengths = {v.strip() for n, v in head.headers if n.lower() == "content-length"}
    if lengths:
        return int(lengths.pop())  # llhttp refused a second one and anything but digits
    return NO_BODY if request else UNTIL_CLOSE


class Chunked:
    """Where a chunked body ends, scanned from the bytes as they come; data is skipped, never read."""

    def __init__(self) -> None:
        self._left = 0  # data bytes (and their CRLF) still to skip
        self._line = b""  # an incomplete size or trailer line
        self._trailers = -1  # bytes of trailers so far; -1: not in the trailers yet
        self._crlf_pending = False  # a chunk's data was skipped, its CRLF not yet seen

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0) -> int:
        """Scan data[start:]; the offset just past the body's end, or -1 when it goes on."""
        pos, n = start, len(data)
        while pos < n:
            if self._left:
                step = min(self._left, n - pos)
                self._left -= step
                pos += step
                continue
            held = len(self._line)
            window = self._line + bytes(data[pos:pos + MAX_LINE + 2])
            end = window.find(b"\r\n")
            if end < 0:
                if len(window) > MAX_LINE:
                    raise Malformed("chunk line too long")
                self._line = window
                return -1
            self._line = b""
            pos += end + 2 - held
            if self._line_done(window[:end]):
                return pos
        return -1

    def _line_done(self, line: bytes) -> bool:
        """Take one complete line (CRLF excluded); True when it ended the body."""
        if b"\n" in line or b"\r" in line:
            raise Malformed("bare CR or LF in a chunked body")
        if self._crlf_pending:  # the CRLF after a chunk's data
            if line:
                raise Malformed("chunk data longer than its size")
            self._crlf_pending = False
            return False
        if self._trailers >= 0:
            self._trailers += len(line) + 2
            if self._trailers > MAX_TRAILERS:
                raise Malformed("trailers too long")
            return not line
        size, _, _ext = line.partition(b";")
        if not _HEX.fullmatch(size):
            raise Malformed("bad chunk size")
        self._left = int(size, 16)
        if self._left == 0:
            self._trailers = 0
        else:
            self._crlf_pending = True
        return False
