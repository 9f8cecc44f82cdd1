"""The steal proxy's fast head path (framing.plain_request / plain_response) against the strict one.

From the attacker's side: whatever bytes a client sends, the regex fast path may only take a
head that llhttp's strict mode (HeadReader) takes too, with the same method, target, headers,
keep-alive and body framing; a head llhttp refuses (CL+TE, two lengths, obs-fold, bare LF or
CR, a blank before the colon, a sign in the length) must never get through the fast path.
The same for responses against response_head.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord_tun.agent.steal import framing

_FIELDS = ("size", "version", "method", "target", "status", "headers", "keep_alive", "length")

# Pieces an attacker would combine, good and bad, so that heads near the edge come up often.
_LINES = [b"Host: x", b"X-Dev: me", b"X-Dev:me  ", b"x-a:\t v \t", b"Content-Length: 5", b"content-length: 5",
          b"Content-Length: +5", b"Content-Length: 5, 5", b"Content-Length:  6 ", b"Transfer-Encoding: chunked",
          b"Transfer-Encoding: gzip", b"Connection: close", b"Connection: keep-alive", b"Upgrade: h2c",
          b"Expect: 100-continue", b" folded: on", b"\tx-dev: me", b"X-Dev : me", b"X-Dev: m\re", b"X-Dev: m\ne",
          b"X-\x00: a", b"X-A: \x7f", b"X-A: caf\xc3\xa9", b"Proxy-Connection: close", b"", b"Bad Name: x"]
_REQUEST_LINES = [b"GET / HTTP/1.1", b"GET /a?b=c&d HTTP/1.0", b"POST /u HTTP/1.1", b"HEAD /x HTTP/1.1",
                  b"GET http://h/ HTTP/1.1", b"GET * HTTP/1.1", b"BREW / HTTP/1.1", b"GET /a b HTTP/1.1",
                  b"GET / HTTP/2.0", b"get / HTTP/1.1", b"GET /%zz HTTP/1.1", b"GET /#f HTTP/1.1"]
_ENDS = [b"\r\n", b"\n", b"\r"]


@st.composite
def _heads(draw: st.DrawFn, first: list[bytes]) -> bytes:
    lines = [draw(st.sampled_from(first))] + draw(st.lists(st.sampled_from(_LINES), max_size=5))
    ends = [draw(st.sampled_from(_ENDS)) if draw(st.integers(0, 9)) == 0 else b"\r\n" for _ in lines]
    tail = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]))
    return b"".join(line + end for line, end in zip(lines, ends)) + tail + draw(st.binary(max_size=8))


def _strict_request(data: bytes) -> framing.Head | None:
    try:
        return framing.HeadReader().feed(data)
    except (framing.Malformed, framing.NotHttp1):
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_heads(_REQUEST_LINES))
def test_the_fast_request_path_takes_only_what_llhttp_takes_and_frames_it_alike(data: bytes) -> None:
    fast = framing.plain_request(data)
    if fast is None:
        return
    strict = _strict_request(data)
    assert strict is not None, f"fast path took a head llhttp refuses: {data!r}"
    assert [getattr(fast, f) for f in _FIELDS] == [getattr(strict, f) for f in _FIELDS], data


def test_the_fast_request_path_takes_the_usual_heads() -> None:
    head = framing.plain_request(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Dev:  me \r\n\r\n")
    assert head is not None and head.headers == [("Host", "x"), ("X-Dev", "me")] and head.keep_alive
    head = framing.plain_request(b"POST /u HTTP/1.0\r\nContent-Length: 12\r\n\r\nbody")
    assert head is not None and head.length == 12 and not head.keep_alive and head.size == 40
    for smuggling in (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                      b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                      b"GET / HTTP/1.1\r\nX-A: b\r\n x-dev: me\r\n\r\n",
                      b"GET / HTTP/1.1\nX-Dev: me\r\n\r\n",
                      b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\n\r\n"):  # past _REQUEST_LINE's target
        assert framing.plain_request(smuggling) is None, smuggling[:40]
    assert framing.plain_request(b"GET /" + b"a" * 8191 + b" HTTP/1.1\r\n\r\n") is not None


_STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 x",
                 b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue", b"HTTP/1.1 200", b"HTTP/2 200",
                 b"HTTP/1.1 99 x", b"HTTP/1.1 500 caf\xc3\xa9"]


def _strict_response(data: bytes) -> framing.Head | None:
    try:
        return framing.response_head(data)
    except framing.Malformed:
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_heads(_STATUS_LINES))
def test_the_fast_response_path_frames_as_the_line_scan_does(data: bytes) -> None:
    try:
        fast = framing.plain_response(data)
    except framing.Malformed:  # a framing it cannot take (a sign in the length): the scan refuses it too
        assert _strict_response(data) is None, data
        return
    if fast is None:
        return
    strict = _strict_response(data)
    assert strict is not None, f"fast path took a response the scan refuses: {data!r}"
    assert [getattr(fast, f) for f in _FIELDS] == [getattr(strict, f) for f in _FIELDS], data
