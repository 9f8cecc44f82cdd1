"""A port-forward to the agent pod as a plain socket, for asyncssh to run SSH over.

The client's PortForward relays between a websocket and one end of a socketpair
in a thread of its own; it hands out that end wrapped in a proxy object, which
asyncio's transports do not accept. A dup of its fd as a real socket does.
"""
from __future__ import annotations

import contextlib
import os
import socket

from kubernetes.stream import portforward

from mirrord_tun.kube.cluster import Cluster, api_errors

DRAIN_TIMEOUT = 2.0  # seconds for the proxy thread to see our EOF and close its end


class Forward:
    def __init__(self, cluster: Cluster, pod: str, namespace: str, port: int) -> None:
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
