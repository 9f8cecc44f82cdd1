"""The one error of the Kubernetes side: what the cluster or the kubeconfig refused or lacks.

Its own module so that every kube module (cluster.py, kubeconfig.py, ...) can raise it
without importing another.
"""
from __future__ import annotations

from mirrord_tun.connect import SetupError


class KubeError(SetupError):
    """The cluster refused or lacks something: one line for the user, exit 2."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the API's HTTP status, when the API said no
