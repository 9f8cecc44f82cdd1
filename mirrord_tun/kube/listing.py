"""What `--target` can name right now, for `mirrord-ns ls` and shell completion.

The same rule as `targets.resolve`: a pod when it is running and ready; a
deployment or statefulset when at least one running, ready pod matches its
selector. The agents' own pods are not targets, nor pods on their node's network
(hostNetwork), which `resolve` refuses.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import Cluster, api_errors
from mirrord_tun.kube.errors import KubeError
from mirrord_tun.kube.targets import is_ready, matches

log = logging.getLogger("mirrord-ns")
# As `ls` prints them (and `--target` accepts them); the order of the listing.
KIND_PREFIX = {"pod": "pod", "deployment": "deploy", "statefulset": "statefulset"}


@dataclass(frozen=True)
class Target:
    target: str  # "pod/web", "deploy/web", "statefulset/db"
    namespace: str
    kind: str  # pod, deployment, statefulset
    name: str
    containers: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def targets(cluster: Cluster, all_namespaces: bool, timeout: float | None = None) -> list[Target]:
    """The namespace's targets (every namespace's with all_namespaces), by namespace, kind, name."""
    where = "every namespace" if all_namespaces else f"namespace {cluster.namespace}"
    pods = [p for p in _list(cluster, "pods", where, all_namespaces, timeout)
            if is_ready(p) and not p.spec.host_network and manifest.LABEL_SESSION not in (p.metadata.labels or {})]
    found = [Target(f"pod/{p.metadata.name}", p.metadata.namespace, "pod", p.metadata.name,
                    [c.name for c in p.spec.containers]) for p in pods]
    for kind, plural in (("deployment", "deployments"), ("statefulset", "statefulsets")):
        try:
            workloads = _list(cluster, plural, where, all_namespaces, timeout)
        except KubeError as e:
            if e.status != 403:
                raise
            log.warning("%s (listing %s needs the \"list\" verb)", e, plural)
            continue
        for w in workloads:
            selector = w.spec.selector
            if selector and any(p.metadata.namespace == w.metadata.namespace
                                and matches(selector, p.metadata.labels or {}) for p in pods):
                template = w.spec.template.spec if w.spec.template and w.spec.template.spec else None
                found.append(Target(f"{KIND_PREFIX[kind]}/{w.metadata.name}", w.metadata.namespace, kind,
                                    w.metadata.name, [c.name for c in (template.containers if template else [])]))
    order = list(KIND_PREFIX)
    return sorted(found, key=lambda t: (t.namespace, order.index(t.kind), t.name))


def namespaces(cluster: Cluster, timeout: float | None = None) -> list[str]:
    with api_errors("cannot list namespaces"):
        return sorted(n.metadata.name for n in cluster.core.list_namespace(_request_timeout=timeout).items)


def _list(cluster: Cluster, plural: str, where: str, all_namespaces: bool, timeout: float | None) -> list[Any]:
    api: Any = cluster.core if plural == "pods" else cluster.apps
    singular = {"pods": "pod", "deployments": "deployment", "statefulsets": "stateful_set"}[plural]
    call: Callable[..., Any]
    if all_namespaces:
        call = getattr(api, f"list_{singular}_for_all_namespaces")
        args: tuple[str, ...] = ()
    else:
        call, args = getattr(api, f"list_namespaced_{singular}"), (cluster.namespace,)
    with api_errors(f"cannot list {plural} in {where}"):
        return list(call(*args, _request_timeout=timeout).items)
