"""A port-forward to the agent pod as a plain socket, for asyncssh to run SSH over.

The client's PortForward relays between a websocket and one end of a socketpair
in a thread of its own; it hands out that end wrapped in a proxy object, which
asyncio's transports do not accept. A dup of its fd as a real socket does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from kubernetes.stream import portforward

from mirrord_tun.kube.cluster import Cluster, api_errors

log = logging.getLogger("mirrord-ns")
DRAIN_TIMEOUT = 2.0  # seconds for the proxy thread to see our EOF and close its end
PROXY_THREAD = "Kubernetes port forward proxy"  # the client's thread names start so


def quiet_proxy_threads() -> None:
    """The client's proxy thread may die with a traceback when the agent pod goes away under it
    (seen on a real cluster when a flood got the agent OOMKilled: EBADF closing a socket that it
    and the websocket's end both closed). That loss is run's to say, once, in one line."""
    previous = threading.excepthook
    if getattr(previous, "mirrord_ns", False):
        return

    def hook(args: "threading.ExceptHookArgs") -> None:
        if args.thread is not None and args.thread.name.startswith(PROXY_THREAD):
            log.debug("port-forward thread ended: %r", args.exc_value)
        else:
            previous(args)
    hook.mirrord_ns = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Forward:
    def __init__(self, cluster: Cluster, pod: str, namespace: str, port: int) -> None:
        quiet_proxy_threads()
        with api_errors(f"cannot port-forward to pod/{pod} port {port}"):
            self._pf = portforward(cluster.core.connect_get_namespaced_pod_portforward, pod, namespace,
                                   ports=str(port))
        self.port = port
        self.sock = socket.socket(fileno=os.dup(self._pf.socket(port).fileno()))

    def error(self) -> str | None:
        """What the kubelet said on the port's error channel (e.g. nothing listening), if anything."""
        return self._pf.error(self.port)

    def close(self) -> None:
        """Hang up the way the proxy thread expects. Our last fd closing while bytes it sent us
        are unread makes its recv fail with ECONNRESET, a traceback on the user's terminal
        (seen with a real kubelet): so first our EOF, then whatever it still sends read and
        dropped until it closes its end."""
        original = self._pf.socket(self.port)
        if original.fileno() != -1:
            with socket.socket(fileno=os.dup(original.fileno())) as s, contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
                s.settimeout(DRAIN_TIMEOUT)
                while s.recv(65536):
                    pass
        self.sock.close()
        self._pf.close()
