"""The steal proxy (agent/steal/http1.py) driven by real HTTP clients: curl --http1.0, ab, and
nginx as a front proxy with its default proxy_pass (HTTP/1.0 upstream, Connection: close).

Each client runs once with a request that matches the filter and once with one that does
not; both must work as they would against the server alone. The servers are
test_httpsteal's: they answer "NAME METHOD PATH LENGTH SHA256".
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from mirrord_tun.sandbox import nginx as nginx_conf
from test_httpsteal import HOST, TIMEOUT, Proxy, _expect, _proxy, servers  # noqa: F401 - fixture

MINE = "X-Dev: me"
OTHER = "X-Dev: someone-else"


@pytest.fixture
def proxy(servers) -> Iterator[Proxy]:  # noqa: F811
    p = _proxy(servers)
    yield p
    p.stop()


def _curl(*args: str) -> bytes:
    out = subprocess.run(["curl", "-sS", "--fail", *args], capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("mine", [True, False])
def test_curl_http10_get_and_post(servers, proxy, tmp_path: Path, mine: bool) -> None:  # noqa: F811
    name = "local" if mine else "pod"
    header = MINE if mine else OTHER
    url = f"http://{HOST}:{proxy.port}"
    assert _curl("--http1.0", "-H", header, f"{url}/ten?q=1") == _expect(name, "GET", "/ten?q=1", b"")
    body = os.urandom(300_000)
    (tmp_path / "body").write_bytes(body)
    got = _curl("--http1.0", "-H", header, "--data-binary", f"@{tmp_path / 'body'}", f"{url}/up")
    assert got == _expect(name, "POST", "/up", body)
    # HTTP/1.0 keep-alive, two requests on one connection
    got = _curl("--http1.0", "-H", header, "-H", "Connection: keep-alive", f"{url}/a", f"{url}/b")
    assert got == _expect(name, "GET", "/a", b"") + _expect(name, "GET", "/b", b"")
    assert proxy.idle()


@pytest.mark.skipif(not shutil.which("ab"), reason="needs ab (apache2-utils)")
@pytest.mark.parametrize("keep_alive", [False, True])
@pytest.mark.parametrize("mine", [True, False])
def test_ab_http10_with_and_without_keep_alive(servers, proxy, mine: bool, keep_alive: bool) -> None:  # noqa: F811
    pod, local = servers
    out = subprocess.run(["ab", "-n", "200", "-c", "8", *(["-k"] if keep_alive else []),
                          "-H", MINE if mine else OTHER, f"http://{HOST}:{proxy.port}/ab"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"Complete requests:\s+200\b", out.stdout), out.stdout
    assert re.search(r"Failed requests:\s+0\b", out.stdout), out.stdout
    assert re.search(r"Non-2xx responses", out.stdout) is None, out.stdout
    want = len(_expect("local" if mine else "pod", "GET", "/ab", b""))
    assert re.search(rf"Document Length:\s+{want} bytes", out.stdout), out.stdout
    assert len((local if mine else pod).requests) == 200 and not (pod if mine else local).requests
    assert proxy.idle()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx(proxy: Proxy, tmp_path: Path) -> Iterator[int]:
    """nginx in front of the proxy, proxy_pass as it comes (HTTP/1.0 upstream); yields its port."""
    if not shutil.which("nginx"):
        pytest.skip("needs nginx (nginx-light)")
    port = _free_port()
    argv = nginx_conf.configure(str(tmp_path), f"{HOST}:{port}", f"proxy_pass http://{HOST}:{proxy.port};")
    p = subprocess.Popen(argv,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                assert p.poll() is None, p.stderr.read() if p.stderr else ""
                subprocess.run(["sleep", "0.05"])
        yield port
    finally:
        p.terminate()
        p.wait(10)


@pytest.mark.parametrize("mine", [True, False])
def test_nginx_front_proxy_with_default_proxy_pass(servers, proxy, nginx: int, tmp_path: Path,  # noqa: F811
                                                   mine: bool) -> None:
    pod, local = servers
    name = "local" if mine else "pod"
    header = MINE if mine else OTHER
    url = f"http://{HOST}:{nginx}"
    for i in range(5):
        assert _curl("-H", header, f"{url}/n{i}?x=y") == _expect(name, "GET", f"/n{i}?x=y", b"")
    body = os.urandom(100_000)
    (tmp_path / "post").write_bytes(body)
    assert _curl("-H", header, "--data-binary", f"@{tmp_path / 'post'}", f"{url}/p") == _expect(name, "POST", "/p", body)
    assert len((local if mine else pod).requests) == 6
    # what nginx sent upstream was HTTP/1.0, so the test is what it says
    assert all(bytes(c).split(b"\r\n", 1)[0].endswith(b"HTTP/1.0") for c in (local if mine else pod).conns)
