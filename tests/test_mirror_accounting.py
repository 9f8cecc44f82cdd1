"""Every mirrored byte is either delivered to the program or counted as lost, with its reason.

Real traffic from the client namespace to the pod, `mirrord-ns run -v` with the
recorder as the program, and the three ways copies used to vanish without a
counter: the program closes connections the client keeps using (nginx's
`keepalive_requests`), the client resets its connection while copies still
wait, the session ends while copies still wait. Each test checks what reached
the program and that the counters add up:
mirror_tcp_bytes == mirror_delivered_bytes + every mirror_undelivered_bytes_<reason>.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import wait_until
from mirrord_tun.sandbox import Sandbox
from test_mirror import (CLIENT, DELIVERY_TIMEOUT, HTTP_PORT, POD, Session, assert_nothing_leaked,
                         assert_pod_answered, counters, pod_sandbox, post, recorder)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN, nft)")

PY = sys.executable
sandbox = pytest.fixture(scope="module", name="sb")(pod_sandbox)

# CONNS keep-alive connections, each REQUESTS POSTs in turn; then each ends with a FIN, or a RST
# (SO_LINGER 0) right after the pod's last answer, while the program may still be behind.
_KEEPALIVE_CLIENT = f"""
import hashlib, http.client, json, random, socket, struct, sys, threading
conns, requests, size, end = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = []
def one(i):
    rng = random.Random(i)
    c = http.client.HTTPConnection("{POD}", {HTTP_PORT}, timeout=60)
    for _ in range(requests):
        body = rng.randbytes(rng.randint(1, size))
        c.request("POST", "/", body=body)
        answer = c.getresponse().read().decode().strip()
        out.append(dict(sha=hashlib.sha256(body).hexdigest(), answer=answer, status=200))
    if end == "rst":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def keepalive(sb: Sandbox, conns: int, requests: int, size: int, end: str = "fin") -> list[dict[str, object]]:
    out = sb.exec("client", PY, "-c", _KEEPALIVE_CLIENT, str(conns), str(requests), str(size), end, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def assert_adds_up(log: str) -> dict[str, int]:
    c = counters(log)
    lost = {k: v for k, v in c.items() if k.startswith("mirror_undelivered_bytes_")}
    assert c["mirror_tcp_bytes"] == c.get("mirror_delivered_bytes", 0) + sum(lost.values()), log
    assert "mirrord-ns: mirrored: " in log, log  # the closing line
    return c


def delivered(s: Session, results: list[dict[str, object]], timeout: float = DELIVERY_TIMEOUT) -> list[str]:
    """The SHA-256 of every sent body that reached the program whole, once all arrived."""
    want = {str(r["sha"]) for r in results}

    def ours() -> list[str]:
        return [str(r["sha"]) for r in s.records() if r["sha"] in want and r["complete"]]

    wait_until(lambda: len(ours()) >= len(results), timeout, interval=0.5)
    return ours()


def test_program_closing_every_7_requests_gets_every_request(sb: Sandbox) -> None:
    # The pod keeps the connections; the program closes each after 7 answers (nginx's
    # keepalive_requests): the rest comes on a new connection from the same client port.
    with Session(sb, "closer", recorder("tcp", HTTP_PORT, "--close-every", "7")) as s:
        s.wait_mirroring()
        results = keepalive(sb, 4, 50, 20_000)
        assert_pod_answered(results)
        got = delivered(s, results)
        assert {r["peer"] for r in s.records()} == {CLIENT}
    assert sorted(got) == sorted(str(r["sha"]) for r in results), s.log()  # after stop: with the counters
    c = assert_adds_up(s.log())
    assert c.get("mirror_reconnects", 0) >= 4 * (50 // 7), s.log()
    assert not any(k.startswith("mirror_undelivered_bytes_") for k in c), s.log()
    assert_nothing_leaked(s.log())


def test_client_reset_while_copies_wait_delivers_them_first(sb: Sandbox) -> None:
    # The program takes 0.3 s per request, the pod none: when the client resets, most of its
    # requests are still waiting on our side. They reach the program before the reset does.
    with Session(sb, "reset", recorder("tcp", HTTP_PORT, "--delay", "0.3")) as s:
        s.wait_mirroring()
        results = keepalive(sb, 3, 8, 200_000, end="rst")
        assert_pod_answered(results)
        got = delivered(s, results)
    assert sorted(got) == sorted(str(r["sha"]) for r in results), s.log()
    c = assert_adds_up(s.log())
    assert not any(k.startswith("mirror_undelivered_bytes_") for k in c), s.log()


def test_session_ending_with_copies_waiting_counts_them(sb: Sandbox) -> None:
    # A program that never reads: the copies wait (in its socket, then ours) until the session ends.
    with Session(sb, "ending", recorder("tcp", HTTP_PORT, "--no-read")) as s:
        wait_until(lambda: s.record.read_text() != "" or post(sb, 1, 1, 16, path="/probe") == [], 30, 0.5)
        assert_pod_answered(post(sb, 4, 4, 4_000_000, seed=21))
        assert wait_until(lambda: s.record.read_text().count("accepted") >= 5, 30, 0.5)
    c = assert_adds_up(s.log())
    assert c.get("mirror_undelivered_bytes_session_end", 0) > 0, s.log()
    assert "session_end" in s.log().split("mirrord-ns: mirrored: ")[1].splitlines()[0], s.log()
