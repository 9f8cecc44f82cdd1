"""`mirrord-ns cleanup`, cluster half: the current user's leftover agent Jobs and pods.

Normally `run` deletes its agent and a lost agent exits on its own and is
collected by the Job's TTL; this is for what neither got to (e.g. an agent image
that never started while the laptop was gone). Only objects carrying both the
mirrord-ns labels and this user's name are touched, and never one whose agent is running: the
name is this machine's user name (`dev`, `ubuntu`), which a teammate's laptop may share, and a
running agent is a live session, or one that ends by itself within its resume grace (60 s).
"""
from __future__ import annotations

import logging

from kubernetes import client

from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import Cluster, api_errors, describe
from mirrord_tun.kube.errors import KubeError
from mirrord_tun.kube.targets import matches, selector_string

log = logging.getLogger("mirrord-ns")


def _running(pod: client.V1Pod) -> bool:
    return bool(pod.status and pod.status.phase == "Running" and not pod.metadata.deletion_timestamp)


def delete_agents(cluster: Cluster, user: str, all_namespaces: bool) -> list[str]:
    """Delete this user's agent Jobs and pods; returns what went, as kind/namespace/name."""
    selector = client.V1LabelSelector(match_labels={manifest.LABEL_APP: manifest.APP, manifest.LABEL_USER: user})
    query = selector_string(selector)
    with api_errors("cannot list agent jobs and pods"):
        if all_namespaces:
            jobs = cluster.batch.list_job_for_all_namespaces(label_selector=query).items
            pods = cluster.core.list_pod_for_all_namespaces(label_selector=query).items
        else:
            jobs = cluster.batch.list_namespaced_job(cluster.namespace, label_selector=query).items
            pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=query).items
    # A Job is live while a pod it controls runs (the agent exits once its session is over).
    live = {o.uid for p in pods if _running(p) for o in p.metadata.owner_references or [] if o.controller}
    gone, kept = [], []
    for kind, items, delete in (
        ("job", jobs, lambda n, ns: cluster.batch.delete_namespaced_job(n, ns, propagation_policy="Background")),
        ("pod", pods, cluster.core.delete_namespaced_pod),
    ):
        for obj in items:
            if not matches(selector, obj.metadata.labels or {}):
                continue  # the server ignored the selector; never touch what is not ours
            if kind == "pod" and any(o.controller and o.kind == "Job" for o in obj.metadata.owner_references or []):
                continue  # goes with its Job (and so needs no `pods delete`, which reaches every pod)
            name, ns = obj.metadata.name, obj.metadata.namespace
            running = obj.metadata.uid in live if kind == "job" else _running(obj)
            if running:
                kept.append(f"{kind}/{ns}/{name}")
                continue
            try:
                delete(name, ns)
            except client.ApiException as e:
                if e.status == 404:
                    continue  # collected meanwhile: a Job's pods go with it
                raise KubeError(f"cannot delete {kind} {ns}/{name}: {describe(e)}") from None
            gone.append(f"{kind}/{ns}/{name}")
    if kept:
        log.warning("left %s: its agent is running (a live session, maybe of another laptop's user of this "
                    "name; it ends by itself within a minute of its session)", ", ".join(kept))
    return gone
