"""The port-forward path: SSH over the socket the kubernetes client's PortForward hands out.

The emulator cannot port-forward, so `kubernetes.stream.portforward` is replaced by a
stand-in built like the real one (a socketpair, one end handed out behind a proxy
object, a thread relaying the other end), relaying to a real agent in the sandbox's
node namespace instead of a websocket.
"""
from __future__ import annotations

import asyncio
import select
import socket
import threading
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from conftest import Cluster
from kube_env import in_netns
from mirrord_tun.kube import portforward as pf_module
from mirrord_tun.kube.portforward import Forward
from mirrord_tun.run import LocalSession
from mirrord_tun.sandbox import ADDRS, NODE_UPLINK


class FakePortForward:
    class _Proxy:  # like kubernetes.stream.ws_client.PortForward._Port._Socket
        def __init__(self, sock: socket.socket) -> None:
            self._socket = sock

        def __getattr__(self, name: str) -> Any:
            return getattr(self._socket, name)

    def __init__(self, upstream: socket.socket, port: int) -> None:
        self.port = port
        ours, self._theirs = socket.socketpair()
        self._proxy = self._Proxy(ours)
        self._upstream = upstream
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        peers = {self._theirs: self._upstream, self._upstream: self._theirs}
        try:
            while True:
                ready, _, _ = select.select(list(peers), [], [])
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            return
        finally:
            self._theirs.close()
            self._upstream.close()

    def socket(self, port: int) -> _Proxy:
        assert port == self.port
        return self._proxy

    def error(self, port: int) -> str | None:
        return None

    def close(self) -> None:
        self._proxy._socket.close()


def test_session_over_a_port_forward_socket(fresh_cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    sb = fresh_cluster.sb
    calls = []

    def fake_portforward(api_method: Any, name: str, namespace: str, ports: str) -> FakePortForward:
        calls.append((name, namespace, ports))
        # The websocket's far end: the agent, dialled from the laptop namespace.
        upstream = in_netns(sb.netns_path("laptop"), lambda: socket.create_connection((NODE_UPLINK, 2222), 5))
        return FakePortForward(upstream, int(ports))

    monkeypatch.setattr(pf_module, "portforward", fake_portforward)
    cluster = SimpleNamespace(core=SimpleNamespace(connect_get_namespaced_pod_portforward=None))
    forward = Forward(cluster, "mirrord-ns-agent-x", "default", 2222)  # type: ignore[arg-type]
    assert calls == [("mirrord-ns-agent-x", "default", "2222")]
    assert isinstance(forward.sock, socket.socket)  # a real socket, as asyncio needs
    key = asyncssh.read_private_key(sb.keys.identity)
    pinned = asyncssh.read_public_key(sb.keys.host_pub)

    async def go() -> int:
        session = LocalSession(["curl", "-s", f"http://{ADDRS['svc']}/"], "pod/mirrord-ns-agent-x:2222",
                               key, pinned, sock=forward.sock)
        return await session.run()

    try:
        assert asyncio.run(go()) == 0
    finally:
        forward.close()
    out = capfd.readouterr().out
    assert f"you are {ADDRS['pod']}" in out, out


def test_the_proxy_threads_death_prints_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """Seen on the real cluster as the agent pod was OOMKilled: the client's proxy thread died with
    'OSError: [Errno 9] Bad file descriptor' and its traceback on the user's terminal, above run's
    own one line. Other threads' errors still print."""
    previous = threading.excepthook
    threading.excepthook = threading.__excepthook__  # Python's own, which prints (not pytest's)
    try:
        pf_module.quiet_proxy_threads()
        pf_module.quiet_proxy_threads()  # once is enough: no hook around the hook

        def die() -> None:
            raise OSError(9, "Bad file descriptor")
        for name in (f"{pf_module.PROXY_THREAD}: 2222", "someone else's"):
            t = threading.Thread(target=die, name=name)
            t.start()
            t.join()
    finally:
        threading.excepthook = previous
    err = capsys.readouterr().err
    assert "Kubernetes port forward proxy" not in err and "someone else's" in err, err
