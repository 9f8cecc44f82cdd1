"""Create the agent's Job, wait for its pod, pin its host key, delete it all afterwards.

The agent makes its host key at start and prints the public half in one log
line; reading that line through the API is what makes the key trustworthy (only
the pod's own output can say it), so nothing is ever trusted on first use.

That holds only for the Job's own pod. Labels can be copied onto any pod, so the
pod is the one whose controller reference names the Job's UID (taken from the
create response, which nobody else can have answered), and whose controller-uid
label, where the Job controller set one, agrees. A second pod claiming the Job,
a pod replaced under the same name while its log was read, or a log with the key
line twice (something else writes into it) ends the session instead.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import asyncssh
from kubernetes import client

from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import Cluster, KubeError, api_errors, describe
from mirrord_tun.kube.targets import matches, selector_string

log = logging.getLogger("mirrord-ns")
START_TIMEOUT = 60
POLL = 0.5
RUNNING = "running"
# Container states that will not get better by waiting (the kubelet would only back off).
FATAL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                 "CrashLoopBackOff"}
_LISTENING = re.compile(r"mirrord-ns agent listening on \S+ netns \S+ host-key (\S+ \S+)")
# Set by the Job controller on its pods: the current name, and the one before Kubernetes 1.27.
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")


@dataclass(frozen=True)
class Started:
    pod: str
    host_key: asyncssh.SSHKey


class AgentJob:
    def __init__(self, cluster: Cluster, job: dict[str, Any]) -> None:
        self.cluster = cluster
        self.job = job
        self.name: str = job["metadata"]["name"]
        self.namespace: str = job["metadata"]["namespace"]
        self.selector = client.V1LabelSelector(match_labels=job["spec"]["template"]["metadata"]["labels"])
        self.pod: str | None = None
        self.uid: str | None = None  # the Job's, once created
        self.created = False

    def start(self, timeout: float = START_TIMEOUT) -> Started:
        # Set before the call: a signal that lands after the API server made the job but before
        # the client returned must still lead to its deletion (a 404 then is harmless).
        self.created = True
        try:
            with api_errors(f"cannot create the agent job {self.name} in namespace {self.namespace}"):
                created = self.cluster.batch.create_namespaced_job(self.namespace, self.job)
        except KubeError:
            self.created = False
            raise
        self.uid = created.metadata and created.metadata.uid
        if not self.uid:
            raise KubeError(f"the API server created job {self.name} but did not say its UID")
        deadline = time.monotonic() + timeout
        state = "no pod yet (kubectl describe job shows why, e.g. a PodSecurity policy refusing hostPID)"
        while time.monotonic() < deadline:
            pod = self._find_pod()
            if pod is not None:
                self.pod = pod.metadata.name
                state = self._check(pod)
                if state == RUNNING:
                    key = self._host_key(pod)
                    if key is not None:
                        log.info("agent pod/%s on %s is up, host key %s", self.pod, pod.spec.node_name,
                                 key.get_fingerprint("sha256"))
                        return Started(self.pod, key)
                    state = "running, its log has no listening line yet"
            time.sleep(POLL)
        raise KubeError(f"agent job {self.name} did not start within {timeout:g} s: {state}")

    def _find_pod(self) -> client.V1Pod | None:
        with api_errors(f"cannot list the pods of job {self.name}"):
            pods = self.cluster.core.list_namespaced_pod(self.namespace, label_selector=selector_string(self.selector))
        ours = [p for p in pods.items if matches(self.selector, p.metadata.labels or {}) and self._owns(p)]
        if len(ours) > 1:  # backoffLimit 0: the Job controller makes one pod, so someone forged the rest
            raise KubeError(f"more than one pod claims to be job {self.name}'s "
                            f"({', '.join(sorted(p.metadata.name for p in ours))}); not trusting any")
        return ours[0] if ours else None

    def _owns(self, pod: client.V1Pod) -> bool:
        """Whether the Job is this pod's controller, as the Job controller records it."""
        meta = pod.metadata
        controller = [o for o in meta.owner_references or [] if o.controller]
        if not (len(controller) == 1 and controller[0].kind == "Job" and controller[0].uid == self.uid):
            return False
        labels = meta.labels or {}
        return all(labels[k] == self.uid for k in CONTROLLER_UID_LABELS if k in labels)

    def _check(self, pod: client.V1Pod) -> str:
        """RUNNING, or the pod's state in a few words; raises if it will never run."""
        status = pod.status or client.V1PodStatus()
        for cs in status.container_statuses or []:
            waiting, terminated = cs.state and cs.state.waiting, cs.state and cs.state.terminated
            if waiting and waiting.reason in FATAL_WAITING:
                raise KubeError(f"agent pod/{pod.metadata.name} cannot start: {waiting.reason}: "
                                f"{waiting.message or ''} (image {cs.image or '?'}; see --agent-image)".rstrip())
            if terminated:
                raise KubeError(f"agent pod/{pod.metadata.name} exited ({terminated.reason}, "
                                f"code {terminated.exit_code}): {self._log_tail()}")
        if status.phase in ("Failed", "Succeeded"):
            raise KubeError(f"agent pod/{pod.metadata.name} {status.phase.lower()}: "
                            f"{status.reason or ''} {status.message or ''}".strip())
        running = status.phase == "Running" and any(cs.state and cs.state.running
                                                     for cs in status.container_statuses or [])
        return RUNNING if running else f"pod/{pod.metadata.name} {status.phase or 'Pending'}"

    def _read_log(self) -> str:
        try:
            return self.cluster.core.read_namespaced_pod_log(self.pod, self.namespace, container=manifest.CONTAINER)
        except client.ApiException as e:
            if e.status == 403:
                raise KubeError(f"cannot read the agent's log: {describe(e)}") from None
            return ""  # not there yet

    def _log_tail(self) -> str:
        lines = self._read_log().strip().splitlines()
        return " / ".join(lines[-3:]) or "no log"

    def _host_key(self, pod: client.V1Pod) -> asyncssh.SSHKey | None:
        lines = list(_LISTENING.finditer(self._read_log()))
        if not lines:
            return None
        if len(lines) > 1:
            raise KubeError(f"agent pod/{self.pod} logged its host-key line {len(lines)} times; "
                            "something else writes into its log, not trusting any")
        key = lines[0][1]
        # Reading a log goes by name: make sure the name still means the pod that was checked.
        with api_errors(f"cannot read pod/{self.pod}"):
            now = self.cluster.core.read_namespaced_pod(self.pod, self.namespace)
        if now.metadata.uid != pod.metadata.uid or not self._owns(now):
            raise KubeError(f"agent pod/{self.pod} was replaced while its log was read; not trusting it")
        try:
            return asyncssh.import_public_key(key)
        except (asyncssh.KeyImportError, ValueError):
            raise KubeError(f"agent pod/{self.pod} printed an unreadable host key: {key!r}") from None

    def delete(self) -> None:
        """Remove the Job, and with it its pod; never raises, since it runs while leaving.

        The garbage collector deletes the pod right after the Job (background propagation), so
        `pods delete`, which would reach every pod of the namespace, is not needed; the agent
        has by then seen its session end and cleaned up, and exits on its own if it has not."""
        if not self.created:
            return
        try:
            self.cluster.batch.delete_namespaced_job(self.name, self.namespace, propagation_policy="Background")
        except Exception as e:  # noqa: BLE001 - leaving must not fail on a flaky API server
            api = isinstance(e, client.ApiException)
            if not (api and e.status == 404):
                log.warning("could not delete the agent job %s: %s; `mirrord-ns cleanup` will",
                            self.name, describe(e) if api else e)
        self.created = False
