"""The API connection, read from kubeconfig as kubectl reads it, and API errors as one line."""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Iterator

from kubernetes import client
from urllib3.exceptions import HTTPError

from mirrord_tun.kube import kubeconfig as kc
from mirrord_tun.kube import operations
from mirrord_tun.kube.errors import KubeError

RBAC_HINT = "deploy/rbac.yaml lists the permissions mirrord-ns needs"
# websocket-client's refusal, as the kubernetes client passes it on: "Handshake status 403 Forbidden
# -+-+- {headers} -+-+- body".
_HANDSHAKE = re.compile(r"Handshake status (\d+) (.*?) -\+-\+- .*? -\+-\+- (.*)$", re.S)


@dataclass
class Cluster:
    api: client.ApiClient
    namespace: str  # -n, else the context's namespace, else "default"

    # The operations we make, by path (kube/operations.py says why not the generated API classes).
    @property
    def core(self) -> operations.ApiGroup:
        return operations.core(self.api)

    @property
    def apps(self) -> operations.ApiGroup:
        return operations.apps(self.api)

    @property
    def batch(self) -> operations.ApiGroup:
        return operations.batch(self.api)


def connect(context: str | None, kubeconfig: str | None, namespace: str | None) -> Cluster:
    """The API of the kubeconfig's context (see kube.kubeconfig for which files and whose rights)."""
    api, context_namespace = kc.api_client(kc.load(kubeconfig), context)
    return Cluster(api, namespace or context_namespace or "default")


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn what the client raises into a KubeError that says what we were doing."""
    try:
        yield
    except client.ApiException as e:
        raise KubeError(f"{what}: {describe(e)}", e.status) from None
    except HTTPError as e:
        raise KubeError(f"{what}: cannot reach the API server: {e}") from None


def describe(e: client.ApiException) -> str:
    status, reason, body = e.status, str(e.reason), e.body
    handshake = _HANDSHAKE.match(reason) if not status else None
    if handshake:  # a refused websocket (port-forward): the client packs status, headers and body into reason
        status, reason, body = int(handshake[1]), handshake[2], handshake[3]
    message = _status_message(body) or reason
    if status == 403:
        return f"forbidden: {message} ({RBAC_HINT})"
    if handshake and 200 <= status < 300:
        return f"the API server answered HTTP {status} instead of opening a websocket"
    return f"{status} {message}" if status else message


def _status_message(body: str | bytes | None) -> str | None:
    """The `message` of a Kubernetes Status object, if the body is one."""
    try:
        obj = json.loads(body or "{}")
    except ValueError:
        return None
    return obj.get("message") if isinstance(obj, dict) and obj.get("kind") == "Status" else None

