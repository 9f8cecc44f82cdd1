"""HTTP/1.x framing for the steal proxy: where a message head ends, what it says, and where its body ends.

Owns: parsing and framing of HTTP/1.x bytes, and nothing else: no sockets, no I/O.

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


class Head:
    """One parsed head; `size`: its bytes in the buffer it came from. A slotted class, not a
    dataclass: one is made per message, and a dataclass's __init__ costs twice as much."""

    __slots__ = ("size", "version", "method", "target", "status", "headers", "keep_alive", "length")

    def __init__(self, size: int = 0, version: str = "", method: str = "", target: str = "", status: int = 0,
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.size, self.version, self.method, self.target, self.status = size, version, method, target, status
        self.headers: list[tuple[str, str]] = headers if headers is not None else []  # requests: names as spelled
        self.keep_alive = False
        self.length = NO_BODY  # NO_BODY, UNTIL_CLOSE, CHUNKED or a Content-Length


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
    """Feed the growing buffer of one client connection until a request head is complete."""

    def __init__(self) -> None:
        self._cb, self._fed = _Callbacks(), 0
        self._parser = httptools.HttpRequestParser(self._cb)

    def feed(self, buf: bytes | bytearray) -> Head | None:
        """The head once `buf` (all bytes since the head began) holds all of it, else None."""
        if self._fed == 0 and b"\n" in buf[:8300]:
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
        head = Head(size=stop, version=self._parser.get_http_version(),
                    method=self._parser.get_method().decode("latin-1"), target=self._cb.url.decode("latin-1"),
                    headers=[(n.decode("latin-1"), v.decode("latin-1").rstrip(" \t")) for n, v in self._cb.headers])
        if head.version not in ("1.0", "1.1"):
            raise NotHttp1(f"HTTP/{head.version}")
        _frame(head, self._cb.headers, request=True)  # llhttp refused two lengths, signs, CL with TE
        return head


# The fast path (plain_request, plain_response): one regex over a whole head that only
# admits what llhttp's strict mode admits too, a subset: a known method, an origin-form
# target of unreserved/sub-delim/percent characters (at most _REQUEST_LINE's 8192),
# HTTP/1.0 or 1.1, token names with the colon right after them, values of visible ASCII, SP
# and HT (no obs-fold, no bare CR or LF: a line starting with a blank is not a token).
# Anything else is left to llhttp.
_PLAIN_REQUEST = re.compile(
    rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) (/[-A-Za-z0-9._~!$&'()*+,;=:@/?%]{0,8191}) HTTP/1\.([01])\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t -~]*\r\n)*)\r\n")
_PLAIN_RESPONSE = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\t -~\x80-\xff]*)?\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t -~\x80-\xff]*\r\n)*)\r\n")


def _any_case(*names: str) -> bytes:
    """An alternation of `names` in any case, as character classes: re.IGNORECASE makes a search
    over a whole head 7x slower (no literal prefix for the engine to skip ahead with)."""
    return b"|".join(b"".join(b"[%s%s]" % (c.upper().encode(), c.encode()) if c.isalpha() else re.escape(c).encode()
                              for c in name) for name in names)


# The framing headers of a plain head, searched from the LF ending the line before its headers.
_FRAMING_REQUEST = re.compile(rb"\n(" + _any_case("content-length", "transfer-encoding", "connection", "upgrade",
                                                  "expect") + rb"):")
_FRAMING_RESPONSE = re.compile(rb"\n(" + _any_case("content-length", "transfer-encoding", "connection")
                               + rb"):([^\r]*)")
_DIGITS = re.compile(rb"[ \t]*([0-9]{1,15})[ \t]*\r\n")


def plain_request(data: bytes) -> Head | None:
    """The request head at the start of `data` when it is a plain one (see _PLAIN_REQUEST) whose
    framing is at most one Content-Length of digits (no Transfer-Encoding, Connection, Upgrade or
    Expect), else None: HeadReader (llhttp) decides then. What this admits llhttp admits, framed
    the same way, so the fast path never forwards what the strict parser would refuse."""
    m = _PLAIN_REQUEST.match(data)
    if m is None or m.end() > MAX_HEAD:
        return None
    block, start, end = m[4], m.start(4) - 1, m.end()
    length = NO_BODY
    framing = _FRAMING_REQUEST.search(data, start, end)
    if framing is not None:
        if framing[1].lower() != b"content-length" or _FRAMING_REQUEST.search(data, framing.end(), end):
            return None
        digits = _DIGITS.match(data, framing.end(), end)
        if digits is None:
            return None
        length = int(digits[1])
    headers = []
    for line in block.decode("latin-1").split("\r\n")[:-1]:  # split and partition: 3x a findall here
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    method, target, minor = m.group(1, 2, 3)
    head = Head(m.end(), "1.1" if minor == b"1" else "1.0", method.decode(), target.decode(), 0, headers)
    head.keep_alive, head.length = minor == b"1", length
    return head


def plain_response(data: bytes | bytearray) -> Head | None:
    """The response head at the start of `data` when it is whole and plain (see _PLAIN_RESPONSE),
    framed as response_head would; else None (response_head decides then)."""
    m = _PLAIN_RESPONSE.match(data)
    if m is None:
        return None
    head = Head(m.end(), "1.1" if m[1] == b"1" else "1.0", status=int(m[2]))
    found = _FRAMING_RESPONSE.findall(data, m.start(3) - 1, m.end())
    if len(found) == 1 and head.version == "1.1" and head.status >= 200 and head.status not in (204, 304) \
            and found[0][0].lower() == b"content-length" and found[0][1].strip().isdigit():
        head.keep_alive, head.length = True, int(found[0][1])  # the usual case, as _frame would say
    else:
        _frame(head, found, request=False)
    return head


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?\r\n")


def response_head(buf: bytes | bytearray) -> Head | None:
    """The response head at the start of `buf` once it is all there, else None.

    Responses come from the pod's server or the session's program, not from the client, and
    only their framing matters here (their bytes are relayed as they are): a plain scan of
    the lines, strict where the framing is concerned (one Content-Length, no obs-fold)."""
    if len(buf) >= 7 and not buf.startswith(b"HTTP/1.") or len(buf) < 7 and not b"HTTP/1.".startswith(buf):
        raise Malformed("not an HTTP/1.x response")
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise Malformed(f"response head over {MAX_HEAD} bytes")
        return None
    m = _STATUS_LINE.match(buf)
    if m is None:
        raise Malformed("bad status line")
    raw = []
    lines = bytes(buf[m.end():end]).split(b"\r\n") if m.end() < end else []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t") or b"\n" in line:
            raise Malformed("bad response header line")
        raw.append((name, value.strip()))
    head = Head(size=end + 4, version="1." + chr(m[1][0]), status=int(m[2]))
    _frame(head, raw, request=False)
    return head


def _frame(head: Head, raw: list[tuple[bytes, bytes]], request: bool) -> None:
    """keep_alive and length from the raw headers, in one pass (RFC 9112 §6.3, §9.3)."""
    connection: list[bytes] = []
    codings: list[bytes] = []
    lengths: set[bytes] = set()
    for name, value in raw:
        name = name.lower()
        if name == b"connection":
            connection += [t.strip() for t in value.lower().split(b",")]
        elif name == b"transfer-encoding":
            codings += [t.strip() for t in value.lower().split(b",")]
        elif name == b"content-length":
            lengths.add(value.strip())
    head.keep_alive = b"close" not in connection and (head.version == "1.1" or b"keep-alive" in connection)
    head.length = _length(head.version, head.status, codings, lengths, request)


def _length(version: str, status: int, codings: list[bytes], lengths: set[bytes], request: bool) -> int:
    """The body's framing; a response's also depends on its request (HEAD), which the caller applies."""
    if not request and (status < 200 or status in (204, 304)):
        return NO_BODY
    if codings:
        if version == "1.0":
            raise Malformed("Transfer-Encoding in an HTTP/1.0 message")  # §6.1: the framing is faulty
        if codings[-1] == b"chunked":
            return CHUNKED
        if request:
            raise Malformed("Transfer-Encoding not ending in chunked")
        return UNTIL_CLOSE
    if len(lengths) > 1 or lengths and not lengths.copy().pop().isdigit():
        raise Malformed("bad or differing Content-Length")
    if lengths:
        return int(lengths.pop())
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
