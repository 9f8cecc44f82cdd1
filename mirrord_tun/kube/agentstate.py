"""Whether an agent's Job and pod will ever start, from the Job's conditions, the pod's container
states and the Events of both.

A verdict is either the pod's state in a few words (RUNNING once it is up) or a KubeError that
says why it will never start and what to do: an image that cannot be pulled, a node that refuses
the pod, a namespace whose Pod Security refuses hostPID, a container that exited.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from kubernetes import client

from mirrord_tun.kube.errors import KubeError

RUNNING = "running"
# Container states that will not get better by waiting (the kubelet would only back off).
PULL_FAILED = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
FATAL_WAITING = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff"}


def check_job(name: str, namespace: str, uid: str | None, jobs: dict[str, client.V1Job],
              events: list[client.CoreV1Event]) -> None:
    """Raises if the Job `name` (whose UID is `uid`) cannot make its pod or has failed."""
    for event in latest(events):
        if event.reason == "FailedCreate" and "violates PodSecurity" in (event.message or ""):
            refusal = event.message[event.message.index("violates PodSecurity"):]
            raise KubeError(f"namespace {namespace} refuses the agent's pod: {refusal}; the agent "
                            "needs a namespace with Pod Security 'privileged' (-n, or label the namespace "
                            "pod-security.kubernetes.io/enforce=privileged)")
    for job in jobs.values():
        if job.metadata.uid != uid:
            continue
        for c in (job.status and job.status.conditions) or []:
            if c.type == "Failed" and c.status == "True":
                raise KubeError(f"agent job {name} failed: {c.reason or ''}: {c.message or ''}".rstrip(": "))


def check_pod(pod: client.V1Pod, events: Iterable[client.CoreV1Event], job: dict[str, Any],
              log_tail: Callable[[], str]) -> str:
    """RUNNING, or the pod's state in a few words; raises if it will never run (with the last
    lines of its log, from `log_tail()`, if it exited)."""
    status = pod.status or client.V1PodStatus()
    node = job["spec"]["template"]["spec"].get("nodeName")
    for cs in status.container_statuses or []:
        waiting, terminated = cs.state and cs.state.waiting, cs.state and cs.state.terminated
        if waiting and waiting.reason in PULL_FAILED:
            raise _unpullable(job, f"{waiting.reason}: {waiting.message or ''}".rstrip(": "))
        if waiting and waiting.reason in FATAL_WAITING:
            raise KubeError(f"agent pod/{pod.metadata.name} cannot start: {waiting.reason}: "
                            f"{waiting.message or ''} (image {cs.image or '?'}; see --agent-image)".rstrip())
        if terminated:
            raise KubeError(f"agent pod/{pod.metadata.name} exited ({terminated.reason}, "
                            f"code {terminated.exit_code}): {log_tail()}")
    for event in latest(events):
        message = event.message or ""
        if (event.reason == "Failed" and message.startswith("Failed to pull image")) or \
                (event.reason == "BackOff" and message.startswith("Back-off pulling image")):
            raise _unpullable(job, f"{'ErrImagePull' if event.reason == 'Failed' else 'ImagePullBackOff'}: "
                                   f"{message}")
        if node and event.reason in ("FailedScheduling", "TaintManagerEviction"):
            raise _misplaced(f"agent pod/{pod.metadata.name} cannot be scheduled: {message}", node)
    if status.phase in ("Failed", "Succeeded"):
        what = f"agent pod/{pod.metadata.name} {status.phase.lower()}: {status.reason or ''} " \
               f"{status.message or ''}".strip()
        # Refused by the node's kubelet before any container ran (resources, taints, affinity).
        raise _misplaced(what, node) if node and not status.container_statuses else KubeError(what)
    running = status.phase == "Running" and any(cs.state and cs.state.running
                                                 for cs in status.container_statuses or [])
    return RUNNING if running else f"pod/{pod.metadata.name} {status.phase or 'Pending'}"


def _unpullable(job: dict[str, Any], reason: str) -> KubeError:
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    return KubeError(f"agent image {image} cannot be pulled: {reason}; "
                     "give --agent-image or --image-pull-secret")


def _misplaced(what: str, node: str) -> KubeError:
    return KubeError(f"{what}; the agent must run on {node} (the target's node): check its taints/resources")


def latest(events: Iterable[client.CoreV1Event]) -> list[client.CoreV1Event]:
    """Newest first (an event repeated by the kubelet keeps its object, with a later lastTimestamp)."""
    def when(e: client.CoreV1Event) -> Any:
        stamp = e.last_timestamp or e.event_time or e.metadata.creation_timestamp
        return stamp.timestamp() if stamp else 0.0
    return sorted(events, key=when, reverse=True)
