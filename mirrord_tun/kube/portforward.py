"""A port-forward to the agent pod as a plain socket, for asyncssh to run SSH over.

The client's PortForward relays between a websocket and one end of a socketpair
in a thread of its own; it hands out that end wrapped in a proxy object, which
asyncio's transports do not accept. A dup of its fd as a real socket does.
"""
from __future__ import annotations

import os
import socket

from kubernetes.stream import portforward

from mirrord_tun.kube.cluster import Cluster, api_errors


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
        self.sock.close()
        self._pf.close()
