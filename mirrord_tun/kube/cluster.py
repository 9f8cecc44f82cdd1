"""The API connection, read from kubeconfig as kubectl reads it, and API errors as one line."""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from mirrord_tun.connect import SetupError
from mirrord_tun.netns.exec import invoking_user

RBAC_HINT = "deploy/rbac.yaml lists the permissions mirrord-ns needs"
# websocket-client's refusal, as the kubernetes client passes it on: "Handshake status 403 Forbidden
# -+-+- {headers} -+-+- body".
_HANDSHAKE = re.compile(r"Handshake status (\d+) (.*?) -\+-\+- .*? -\+-\+- (.*)$", re.S)


class KubeError(SetupError):
    """The cluster refused or lacks something: one line for the user, exit 2."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the API's HTTP status, when the API said no


@dataclass
class Cluster:
    api: client.ApiClient
    namespace: str  # -n, else the context's namespace, else "default"

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)


def default_kubeconfig() -> str:
    """$KUBECONFIG, else ~/.kube/config of the user behind sudo: root's own is rarely the one meant."""
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"].split(os.pathsep)[0]
    user = invoking_user()
    return os.path.join(user.home if user else os.path.expanduser("~"), ".kube", "config")


def connect(context: str | None, kubeconfig: str | None, namespace: str | None) -> Cluster:
    path = kubeconfig or default_kubeconfig()
    if not os.path.exists(path):
        raise KubeError(f"no kubeconfig at {path} (give --kubeconfig or set KUBECONFIG)")
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        if chosen is None:
            raise KubeError(f"no context {context!r} in {path}")
        api = config.new_client_from_config(config_file=path, context=chosen["name"], persist_config=False)
    except (ConfigException, OSError, ValueError) as e:
        raise KubeError(f"cannot use kubeconfig {path}: {e}") from None
    return Cluster(api, namespace or chosen["context"].get("namespace") or "default")


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

