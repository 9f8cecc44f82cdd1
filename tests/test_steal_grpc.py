"""gRPC through the steal proxy: grpcio's own client and servers (insecure channels: HTTP/2
with prior knowledge), unary and bidirectional streaming calls, each routed by its metadata.
The servers answer "NAME:request"."""
from __future__ import annotations

import time
from concurrent import futures
from typing import Iterator

import pytest

from test_httpsteal import HOST, Proxy

from mirrord_tun.agent.steal.filters import HttpFilter

grpc = pytest.importorskip("grpc")
ME = [("x-dev", "me")]


def _server(name: str):
    def unary(request: bytes, _ctx) -> bytes:
        return f"{name}:".encode() + request

    def stream(requests, _ctx):
        for request in requests:
            yield f"{name}:".encode() + request

    handler = grpc.method_handlers_generic_handler("test.Svc", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    return server, port


@pytest.fixture
def channel() -> Iterator[tuple[object, Proxy]]:
    (pod, pod_port), (local, local_port) = _server("pod"), _server("local")
    proxy = Proxy(pod_port, local_port, HttpFilter.compile("^x-dev: me$", None))
    ch = grpc.insecure_channel(f"{HOST}:{proxy.port}")
    yield ch, proxy
    ch.close()
    proxy.stop()
    pod.stop(0)
    local.stop(0)


def test_unary_and_streaming_calls_on_one_channel_go_where_their_metadata_says(channel) -> None:
    ch, proxy = channel
    unary, stream = ch.unary_unary("/test.Svc/Unary"), ch.stream_stream("/test.Svc/Stream")
    for _ in range(3):
        assert unary(b"hi", metadata=ME, timeout=10) == b"local:hi"
        assert unary(b"hi", timeout=10) == b"pod:hi"
    assert list(stream(iter([b"a", b"b", b"c"]), metadata=ME, timeout=10)) == [b"local:a", b"local:b", b"local:c"]
    assert list(stream(iter([b"a", b"b"]), timeout=10)) == [b"pod:a", b"pod:b"]
    big = bytes(range(256)) * 12_000  # 3 MB: past every window, both ways
    assert unary(big, metadata=ME, timeout=20) == b"local:" + big
    assert proxy.counters["steal_http2"] == 1  # one connection carried every call
    assert proxy.counters["steal_h2_streams_local"] == 5 and proxy.counters["steal_h2_streams_pod"] == 4


def _slowly(n: int):
    for i in range(n):
        yield b"m%d" % i
        time.sleep(0.05)


@pytest.mark.parametrize("metadata,name", [(ME, "local"), ([], "pod")])
def test_bidi_streams_ended_by_a_deadline_and_by_a_cancel(channel, metadata, name: str) -> None:
    """A deadline that expires mid-stream and a cancel after three answers end just their
    stream (RST_STREAM relayed); the channel's next calls go on, routed as before."""
    ch, proxy = channel
    stream, unary = ch.stream_stream("/test.Svc/Stream"), ch.unary_unary("/test.Svc/Unary")
    got = []
    with pytest.raises(grpc.RpcError) as late:
        for answer in stream(_slowly(200), metadata=metadata, timeout=1.0):
            got.append(answer)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got and got == [f"{name}:m{i}".encode() for i in range(len(got))] and len(got) < 200
    call, got = stream(_slowly(200), metadata=metadata, timeout=20), []
    with pytest.raises(grpc.RpcError) as cancelled:
        for answer in call:
            got.append(answer)
            if len(got) == 3:
                call.cancel()
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED and len(got) == 3
    assert unary(b"x", metadata=metadata, timeout=10) == f"{name}:x".encode()
    assert unary(b"y", timeout=10) == b"pod:y"
    assert proxy.counters["steal_http2"] == 1
