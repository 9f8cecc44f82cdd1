"""The agent's Job: a pod on the target's node that can enter the target's namespaces.

A Job rather than a bare pod because only a Job has a TTL: if the laptop dies
the agent exits on its own (`--idle-exit`), the Job finishes, and the cluster
deletes Job and pod `TTL_AFTER_FINISHED` seconds later. `activeDeadlineSeconds`
bounds an agent that somehow never exits.
"""
from __future__ import annotations

import getpass
import os
import re
from typing import Any, Mapping, Sequence

from mirrord_tun import __version__
from mirrord_tun.kube.targets import TargetPod

DEFAULT_IMAGE = f"ghcr.io/mirrord-ns/agent:{__version__}"
AGENT_PORT = 2222
CONTAINER = "agent"
IDLE_EXIT = 10  # plus the SSH keepalive's 15 s when the laptop vanishes without closing
TTL_AFTER_FINISHED = 60
MAX_SESSION_SECONDS = 12 * 3600
CAPABILITIES = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]

LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_SESSION = "mirrord-ns/session"
LABEL_USER = "mirrord-ns/user"
APP = "mirrord-ns-agent"
ANNOTATION_TARGET = "mirrord-ns/target"
# Service meshes inject their proxy into every pod of a namespace that asks for it. In the
# agent's pod the proxy would take over its traffic and, never exiting, keep the Job from
# completing. A user's --agent-annotation of the same key wins.
MESH_OPT_OUT = {
    "sidecar.istio.io/inject": "false",
    "linkerd.io/inject": "disabled",
    "kuma.io/sidecar-injection": "disabled",
    "consul.hashicorp.com/connect-inject": "false",
}


# A qualified name: an optional DNS-subdomain prefix and "/", then up to 63 characters.
_ANNOTATION_KEY = re.compile(r"(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def annotation(spec: str) -> tuple[str, str]:
    """KEY=VALUE as a (key, value) annotation; raises ValueError for what the API server would refuse."""
    key, eq, value = spec.partition("=")
    if not eq:
        raise ValueError(f"{spec!r} is not KEY=VALUE")
    if not _ANNOTATION_KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not an annotation key (PREFIX/NAME, NAME up to 63 letters, digits, '-_.')")
    return key, value


def current_user() -> str:
    """The person behind sudo, as a label value (63 chars of [A-Za-z0-9_.-], alphanumeric ends)."""
    name = os.environ.get("SUDO_USER") or getpass.getuser()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:63].strip("_.-") or "unknown"


def job_name(session: str) -> str:
    return f"{APP}-{session}"


def session_labels(session: str, user: str) -> dict[str, str]:
    return {LABEL_APP: APP, LABEL_MANAGED: "mirrord-ns", LABEL_SESSION: session, LABEL_USER: user}


def listen_address(direct: bool) -> str:
    """Loopback unless the agent is to be dialled directly: the port-forward lands on the pod's
    own loopback, and nothing else on the pod's network should even reach the SSH handshake."""
    return f"{'0.0.0.0' if direct else '127.0.0.1'}:{AGENT_PORT}"


def tolerations(taints: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """What tolerates exactly these taints (a node's spec.taints); None: unknown, so every taint.

    A pod given a nodeName skips the scheduler, but not the taints: one NoExecute taint it does
    not tolerate and the node evicts it."""
    if taints is None:
        return [{"operator": "Exists"}]
    return [{"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]} if t.get("value")
            else {"key": t["key"], "operator": "Exists", "effect": t["effect"]} for t in taints]


def agent_job(*, session: str, user: str, namespace: str, image: str, client_key: str,
              target: TargetPod | None, privileged: bool, direct: bool = False,
              node_taints: list[dict[str, Any]] | None = None, pull_secrets: Sequence[str] = (),
              annotations: Mapping[str, str] | None = None, serve_fs: Sequence[str] = ()) -> dict[str, Any]:
    """The Job manifest; `client_key` is the session's public key in OpenSSH format, `direct`
    whether the client dials the pod's address (--agent-address) rather than port-forwarding,
    `node_taints` the taints of the target's node (None: not known), `annotations` the pod's
    besides the mesh opt-outs, `serve_fs` the agent's --serve-fs."""
    labels = session_labels(session, user)
    # The image's entrypoint is `mirrord-ns` (agent/Dockerfile).
    args = ["agent", "--listen", listen_address(direct), "--authorized-key-data", client_key,
            "--idle-exit", str(IDLE_EXIT), *(a for kind in serve_fs for a in ("--serve-fs", kind))]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostPID": True,  # the target container's processes, and so its namespaces, are visible
        "automountServiceAccountToken": False,  # the agent never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": args,
            "securityContext": {
                "runAsUser": 0,
                "privileged": privileged,
                "capabilities": {"add": CAPABILITIES},
            },
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          "limits": {"cpu": "2", "memory": "256Mi"}},
        }],
    }
    if direct:  # informational only, and only true when something else than a port-forward dials it
        pod_spec["containers"][0]["ports"] = [{"name": "ssh", "containerPort": AGENT_PORT, "protocol": "TCP"}]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in dict.fromkeys(pull_secrets)]
    job_annotations = {}
    if target is not None:
        args += ["--container-id", target.container_id]
        pod_spec["nodeName"] = target.node
        # It must run where the target runs, whatever that node's taints.
        if tolerated := tolerations(node_taints):
            pod_spec["tolerations"] = tolerated
        job_annotations[ANNOTATION_TARGET] = f"pod/{target.name}/{target.container}"
    pod_annotations = {**MESH_OPT_OUT, **(annotations or {}), **job_annotations}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(session), "namespace": namespace, "labels": labels,
                     "annotations": job_annotations},
        "spec": {
            "backoffLimit": 0,  # a failed agent is reported, not retried behind the user's back
            "activeDeadlineSeconds": MAX_SESSION_SECONDS,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            # Copies, so the YAML of --dry-run has no anchors.
            "template": {"metadata": {"labels": dict(labels), "annotations": pod_annotations}, "spec": pod_spec},
        },
    }


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump_all(manifests, sort_keys=False)
