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

The start is followed through watches (kube.feed) of the Job, its pod and the Events
of both, which feed the status line (scheduled, pulling, starting) and say at once
why an agent will not start: an image that cannot be pulled, a node that refuses the
pod, a namespace whose Pod Security refuses hostPID.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

import asyncssh
from kubernetes import client

from mirrord_tun.kube import manifest
from mirrord_tun.kube.agentstate import RUNNING, check_job, check_pod, latest
from mirrord_tun.kube.cluster import Cluster, api_errors, describe
from mirrord_tun.kube.errors import KubeError
from mirrord_tun.kube.feed import POLL, Feed
from mirrord_tun.kube.targets import matches
from mirrord_tun.progress import QUIET, Progress

log = logging.getLogger("mirrord-ns")
START_TIMEOUT = 60
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

    def start(self, timeout: float = START_TIMEOUT, progress: Progress = QUIET) -> Started:
        progress.step("creating agent job…")
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
        feed = Feed(self.namespace)
        try:
            return self._wait(feed, time.monotonic() + timeout, timeout, _Steps(progress, self.job))
        finally:
            feed.close()

    def _wait(self, feed: Feed, deadline: float, timeout: float, steps: "_Steps") -> Started:
        core = self.cluster.core
        pods = feed.follow(f"pods of job {self.name}", core.list_namespaced_pod, required=True,
                           label_selector=self._pods_selector)
        jobs = feed.follow(f"job {self.name}", self.cluster.batch.list_namespaced_job,
                           field_selector=f"metadata.name={self.name}")
        job_events = feed.follow(f"events of job {self.name}", core.list_namespaced_event,
                                 field_selector=f"involvedObject.uid={self.uid}")
        pod_events: dict[str, client.CoreV1Event] = {}
        pod_uid = None
        while True:
            check_job(self.name, self.namespace, self.uid, jobs, _about(job_events, self.uid))
            pod = self._find_pod(pods.values())
            if pod is None and _about(job_events, self.uid):
                steps.job_event(latest(_about(job_events, self.uid))[0])
            if pod is None and pod_uid is not None:
                raise KubeError(f"agent pod/{self.pod} was deleted before it started"
                                f"{': ' + steps.note if steps.note else ''}")
            wait = deadline - time.monotonic()
            if pod is not None:
                if pod_uid is None:
                    self.pod, pod_uid = pod.metadata.name, pod.metadata.uid
                    pod_events = feed.follow(f"events of pod/{self.pod}", core.list_namespaced_event,
                                             field_selector=f"involvedObject.uid={pod_uid}")
                steps.pod(pod, _about(pod_events, pod_uid))
                if check_pod(pod, _about(pod_events, pod_uid), self.job, self._log_tail) == RUNNING:
                    key = self._host_key(pod)
                    if key is not None:
                        log.info("agent pod/%s on %s is up, host key %s", self.pod, pod.spec.node_name,
                                 key.get_fingerprint("sha256"))
                        steps.step(_Steps.READY, "agent ready")
                        return Started(self.pod, key)
                    steps.note = "running, its log has no listening line yet"
                    wait = min(wait, POLL)  # the log is read, not watched
            if time.monotonic() >= deadline:
                raise KubeError(f"agent job {self.name} did not start within {timeout:g} s: "
                                f"{steps.note or 'no pod yet (kubectl describe job shows why)'}")
            feed.wait(max(wait, 0.0))

    @property
    def _pods_selector(self) -> str:
        # The Job's pods carry its UID as controller-uid (the label older releases set, and still do).
        return f"controller-uid={self.uid}"

    def _find_pod(self, pods: Iterable[client.V1Pod]) -> client.V1Pod | None:
        ours = [p for p in pods if matches(self.selector, p.metadata.labels or {}) and self._owns(p)]
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
        # Reading a log goes by name: make sure the name still means the pod that was checked. And
        # from one list, not from the watch: its events come one at a time, so a second pod claiming
        # the Job may not have arrived yet.
        with api_errors(f"cannot list the pods of job {self.name}"):
            listed = self.cluster.core.list_namespaced_pod(self.namespace, label_selector=self._pods_selector)
        now = self._find_pod(listed.items)
        if now is None or now.metadata.uid != pod.metadata.uid:
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


def _about(events: dict[str, client.CoreV1Event], uid: str) -> list[client.CoreV1Event]:
    # A field selector the server may ignore (an emulator) is no filter.
    return [e for e in events.values() if e.involved_object and e.involved_object.uid == uid]


class _Steps:
    """The status line through the agent's start, fed by its pod and the pod's Events.

    Watches deliver pods and Events on separate streams, so a step only ever moves forward."""

    CREATING, SCHEDULED, PULLING, STARTING, READY = range(5)

    def __init__(self, progress: Progress, job: dict[str, Any]) -> None:
        self.progress = progress
        self.image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        self.stage, self.text = self.CREATING, "creating agent job…"
        self.note = ""  # the latest word on why it is not up yet, for a timeout's message

    def step(self, stage: int, text: str) -> None:
        if stage < self.stage:
            return
        if (stage, text) != (self.stage, self.text):
            log.info("%s", text.removesuffix("…"))  # first: a log record clears the status line
        self.stage, self.text = stage, text
        self.progress.step(text)

    def pod(self, pod: client.V1Pod, events: Iterable[client.CoreV1Event]) -> None:
        node = pod.spec and pod.spec.node_name
        if node:
            self.step(self.SCHEDULED, f"scheduled on {node}…")
        unplaced = ""
        for event in reversed(latest(events)):  # oldest first, so the newest has the last word
            if event.reason == "FailedScheduling" and not node:
                unplaced = f"not scheduled yet: {event.message}"
                self.progress.step(unplaced)  # the step stays: the scheduler tries again
            elif event.reason == "Pulling":
                self.step(self.PULLING, f"pulling {self.image}…")
            elif event.reason in ("Pulled", "Created", "Started"):
                self.step(self.STARTING, "agent starting…")
        status = pod.status or client.V1PodStatus()
        if any(cs.state and cs.state.running for cs in status.container_statuses or []):
            self.step(self.STARTING, "agent starting…")
        self.note = unplaced or f"pod/{pod.metadata.name} {status.phase or 'Pending'}"

    def job_event(self, event: client.CoreV1Event) -> None:
        """A Job event while it has no pod: FailedCreate may pass (a quota, a webhook), so it is only shown."""
        if event.reason == "FailedCreate":
            self.note = f"the job cannot make its pod: {event.message}"
            self.progress.step(self.note)
