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
from typing import Any

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


def agent_job(*, session: str, user: str, namespace: str, image: str, client_key: str,
              target: TargetPod | None, privileged: bool, direct: bool = False) -> dict[str, Any]:
    """The Job manifest; `client_key` is the session's public key in OpenSSH format, `direct`
    whether the client dials the pod's address (--agent-address) rather than port-forwarding."""
    labels = session_labels(session, user)
    # The image's entrypoint is `mirrord-ns` (agent/Dockerfile).
    args = ["agent", "--listen", listen_address(direct), "--authorized-key-data", client_key,
            "--idle-exit", str(IDLE_EXIT)]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostPID": True,  # the target container's processes, and so its namespaces, are visible
        "automountServiceAccountToken": False,  # the agent never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        # It must run where the target runs, taints or not.
        "tolerations": [{"operator": "Exists"}],
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
    annotations = {}
    if target is not None:
        args += ["--container-id", target.container_id]
        pod_spec["nodeName"] = target.node
        annotations[ANNOTATION_TARGET] = f"pod/{target.name}/{target.container}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(session), "namespace": namespace, "labels": labels,
                     "annotations": annotations},
        "spec": {
            "backoffLimit": 0,  # a failed agent is reported, not retried behind the user's back
            "activeDeadlineSeconds": MAX_SESSION_SECONDS,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            # Copies, so the YAML of --dry-run has no anchors.
            "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
        },
    }


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump_all(manifests, sort_keys=False)
