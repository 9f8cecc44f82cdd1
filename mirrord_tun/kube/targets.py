"""`--target KIND/NAME` → one running, ready pod and the container to attach to.

A workload target picks, among the pods its selector matches, the oldest that is
running and ready (the one most likely to keep running for the session); a pod
target must itself be running and ready. The container's runtime ID is what the
agent uses on the node to find the container's processes, whatever the runtime.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from mirrord_tun.kube.cluster import Cluster, api_errors
from mirrord_tun.kube.errors import KubeError

log = logging.getLogger("mirrord-ns")
KINDS = {"pod": "pod", "pods": "pod", "po": "pod",
         "deploy": "deployment", "deployment": "deployment", "deployments": "deployment",
         "sts": "statefulset", "statefulset": "statefulset", "statefulsets": "statefulset"}
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"


@dataclass(frozen=True)
class TargetPod:
    pod: client.V1Pod
    container: str
    container_id: str  # as the pod status reports it: RUNTIME://ID

    @property
    def name(self) -> str:
        return self.pod.metadata.name

    @property
    def namespace(self) -> str:
        return self.pod.metadata.namespace

    @property
    def node(self) -> str:
        return self.pod.spec.node_name


def parse(target: str) -> tuple[str, str]:
    kind, sep, name = target.partition("/")
    if not sep or not name or kind.lower() not in KINDS:
        raise KubeError(f"bad target {target!r}: expected pod/NAME, deploy/NAME or statefulset/NAME")
    return KINDS[kind.lower()], name


def resolve(cluster: Cluster, target: str, container: str | None) -> TargetPod:
    kind, name = parse(target)
    ns = cluster.namespace
    where = f"{kind}/{name} in namespace {ns}"
    with api_errors(f"cannot read {where}"):
        try:
            if kind == "pod":
                pod = cluster.core.read_namespaced_pod(name, ns)
                if not is_ready(pod):
                    raise KubeError(f"pod/{name} is not running and ready ({_state(pod)}): nothing to attach to")
            else:
                read = (cluster.apps.read_namespaced_deployment if kind == "deployment"
                        else cluster.apps.read_namespaced_stateful_set)
                pod = _pick(cluster, read(name, ns).spec.selector, where)
        except client.ApiException as e:
            if e.status == 404:
                raise KubeError(f"{where} not found") from None
            raise
    if pod.spec.host_network:
        # Its network namespace is the node's: our TUN, routes and nft table would sit in front of
        # the node's own traffic and that of every hostNetwork pod on it.
        raise KubeError(f"pod/{pod.metadata.name} shares its node's network (hostNetwork: true): a session would "
                        "change the node's own routing and firewall, so mirrord-ns does not target it")
    chosen = _container(pod, container)
    return TargetPod(pod, chosen, _container_id(pod, chosen))


def _pick(cluster: Cluster, selector: client.V1LabelSelector, where: str) -> client.V1Pod:
    pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector_string(selector)).items
    ready = sorted((p for p in pods if matches(selector, p.metadata.labels or {}) and is_ready(p)),
                   key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))
    if not ready:
        raise KubeError(f"{where} has no running, ready pod (selector {selector_string(selector)})")
    log.info("%s: using pod/%s", where, ready[0].metadata.name)
    return ready[0]


def is_ready(pod: client.V1Pod) -> bool:
    status = pod.status
    if pod.metadata.deletion_timestamp or not status or status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def _state(pod: client.V1Pod) -> str:
    phase = (pod.status.phase if pod.status else None) or "Unknown"
    return "terminating" if pod.metadata.deletion_timestamp else phase if phase != "Running" else "not ready"


def _container(pod: client.V1Pod, wanted: str | None) -> str:
    names = [c.name for c in pod.spec.containers]
    if wanted:
        if wanted not in names:
            raise KubeError(f"pod/{pod.metadata.name} has no container {wanted!r} (it has {', '.join(names)})")
        return wanted
    default = (pod.metadata.annotations or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    chosen = default if default in names else names[0]
    if len(names) > 1:
        log.info("pod/%s: using container %s of %s (choose with --container)", pod.metadata.name,
                 chosen, ", ".join(names))
    return chosen


def _container_id(pod: client.V1Pod, container: str) -> str:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == container and status.state and status.state.running and status.container_id:
            return status.container_id
    raise KubeError(f"container {container} of pod/{pod.metadata.name} is not running")


# Label selectors. The server filters by `label_selector`; `matches` repeats the check
# locally so that a pod is never picked on the strength of a server that ignored it.
def selector_string(selector: client.V1LabelSelector) -> str:
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for e in selector.match_expressions or []:
        if e.operator in ("In", "NotIn"):
            parts.append(f"{e.key} {e.operator.lower()} ({','.join(e.values or [])})")
        else:
            parts.append(e.key if e.operator == "Exists" else f"!{e.key}")
    return ",".join(parts)


def matches(selector: client.V1LabelSelector, labels: dict[str, Any]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.match_labels or {}).items()):
        return False
    for e in selector.match_expressions or []:
        present = e.key in labels
        ok = {"In": present and labels[e.key] in (e.values or []),
              "NotIn": not present or labels[e.key] not in (e.values or []),
              "Exists": present, "DoesNotExist": not present}.get(e.operator, False)
        if not ok:
            return False
    return True
