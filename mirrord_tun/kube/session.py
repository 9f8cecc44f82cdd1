"""`run --target …`: from a workload name to an SSH-ready link to an agent next to it.

`prepare` does everything that only reads the cluster (so `--dry-run` can stop
after it and still fail on a bad target); `Plan.launch` creates the agent, hands
out the link for the session, and deletes the agent however the session ends.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import signal
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import asyncssh
from kubernetes import client
from urllib3.exceptions import HTTPError

from mirrord_tun.connect import Gone, SetupError
from mirrord_tun.interrupts import Interrupts
from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import Cluster, connect, describe
from mirrord_tun.kube.env import container_env
from mirrord_tun.kube.launcher import AgentJob
from mirrord_tun.kube.portforward import Forward
from mirrord_tun.kube.targets import TargetPod, resolve
from mirrord_tun.progress import QUIET, Progress

log = logging.getLogger("mirrord-ns")


@dataclass(frozen=True)
class KubeOptions:
    target: str | None  # None: targetless, the agent's own pod is the identity
    namespace: str | None
    container: str | None
    context: str | None
    kubeconfig: str | None
    agent_image: str
    privileged: bool
    agent_address: str | None  # connect here instead of port-forwarding
    env: bool
    env_exclude: frozenset[str]
    env_allow: frozenset[str]  # imported despite kube.env's deny-list
    pull_secrets: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()  # the agent pod's, besides the mesh opt-outs
    serve_fs: tuple[str, ...] = ()  # file systems that can hang, served by --mount anyway (agent --serve-fs)


@dataclass(frozen=True)
class Link:
    address: str
    host_key: asyncssh.SSHKey
    sock: socket.socket | None
    env: dict[str, str]
    probe_sources: tuple[str, ...] = ()  # the target's node (kubelet's probes): --steal leaves it the pod
    volumes: tuple[str, ...] = ()  # the target container's ConfigMap/Secret/projected/downward-API mounts
    # A fresh port-forward's socket, for each attempt to resume after the connection dropped.
    reconnect: Callable[[], socket.socket] | None = None


@dataclass
class Plan:
    opts: KubeOptions
    cluster: Cluster
    target: TargetPod | None
    key: asyncssh.SSHKey  # this session's client key; the agent authorizes only its public half
    job: dict[str, Any]

    def manifests_yaml(self) -> str:
        return manifest.to_yaml([self.job])

    @contextlib.contextmanager
    def launch(self, progress: Progress = QUIET) -> Iterator[Link]:
        agent = AgentJob(self.cluster, self.job)
        forward: Forward | None = None
        forwards: list[Forward] = []  # the reconnects' (each replaces the one before)
        # So that `finally` runs and deletes the agent, also when the terminal closes (SIGHUP).
        with Interrupts((signal.SIGTERM, signal.SIGHUP)) as stop:
            try:
                started = agent.start(progress=progress)
                stop.check()
                env = self._env()
                if self.opts.agent_address:
                    address, sock = self.opts.agent_address, None
                else:
                    forward = Forward(self.cluster, started.pod, agent.namespace, manifest.AGENT_PORT)
                    address, sock = f"pod/{started.pod}:{manifest.AGENT_PORT}", forward.sock
                reconnect = None if forward is None else lambda: reconnect_forward(
                    self.cluster, started.pod, agent.namespace, forwards)
                stop.check()
                yield Link(address, started.host_key, sock, env, self._probe_sources(), self._volumes(), reconnect)
            except SetupError:
                if forward is not None and forward.error():
                    log.error("port-forward: %s", forward.error())
                raise
            finally:
                stop.hold()
                for f in [*forwards, *([forward] if forward else [])]:
                    f.close()
                agent.delete()

    def _volumes(self) -> tuple[str, ...]:
        from mirrord_tun.mounts import volume_mount_paths

        return tuple(volume_mount_paths(self.target.pod, self.target.container)) if self.target else ()

    def _probe_sources(self) -> tuple[str, ...]:
        """The node's addresses (both families on a dual-stack node): the kubelet probes from them."""
        status = self.target.pod.status if self.target else None
        found = [getattr(status, "host_ip", None), *(i.ip for i in getattr(status, "host_ips", None) or [])]
        out = []
        for host_ip in found:
            with contextlib.suppress(ValueError, TypeError):  # absent, or not an address: nothing to exclude
                out.append(str(ipaddress.ip_address(host_ip)))
        return tuple(dict.fromkeys(out))

    def _env(self) -> dict[str, str]:
        if self.target is None or not self.opts.env:
            return {}
        return container_env(self.cluster, self.target, self.opts.env_exclude, self.opts.env_allow)


def prepare(opts: KubeOptions) -> Plan:
    cluster = connect(opts.context, opts.kubeconfig, opts.namespace)
    target = resolve(cluster, opts.target, opts.container) if opts.target else None
    key = asyncssh.generate_private_key("ssh-ed25519")
    job = manifest.agent_job(
        session=secrets.token_hex(4), user=manifest.current_user(),
        namespace=target.namespace if target else cluster.namespace, image=opts.agent_image,
        client_key=key.export_public_key("openssh").decode().strip(), target=target,
        privileged=opts.privileged, direct=opts.agent_address is not None,
        node_taints=_taints(cluster, target.node) if target else None, pull_secrets=opts.pull_secrets,
        annotations=dict(opts.annotations), serve_fs=opts.serve_fs)
    return Plan(opts, cluster, target, key, job)


def _taints(cluster: Cluster, node: str) -> list[dict[str, str]] | None:
    """The node's taints, or None when they cannot be read (nodes are cluster-wide: a role bound
    in one namespace cannot grant reading them)."""
    try:
        spec = cluster.core.read_node(node).spec
    except (client.ApiException, HTTPError) as e:
        log.info("cannot read node %s (%s): the agent tolerates every taint", node,
                 describe(e) if isinstance(e, client.ApiException) else e)
        return None
    return [{"key": t.key, "value": t.value or "", "effect": t.effect} for t in (spec and spec.taints) or []]


def reconnect_forward(cluster: Cluster, pod: str, namespace: str, forwards: list[Forward]) -> socket.socket:
    """A new port-forward to the agent pod, unless the pod is gone: then no attempt can succeed,
    and `run` says so at once instead of retrying for the whole grace period."""
    try:
        found = cluster.core.read_namespaced_pod(pod, namespace)
    except client.ApiException as e:
        if e.status == 404:
            raise Gone(f"the agent pod/{pod} is gone") from None
        raise  # anything else may pass: the next attempt asks again
    phase = found.status and found.status.phase
    if found.metadata.deletion_timestamp or phase in ("Succeeded", "Failed"):
        raise Gone(f"the agent pod/{pod} is gone ({(phase or 'being deleted').lower()}{_why_ended(found)})")
    return _forward_again(forwards, Forward(cluster, pod, namespace, manifest.AGENT_PORT))


def _why_ended(pod: client.V1Pod) -> str:
    """", OOMKilled (exit 137)" when its container ended so: an OOMKilled agent was only "failed"."""
    for cs in (pod.status and pod.status.container_statuses) or []:
        ended = cs.state and cs.state.terminated
        if ended and ended.reason:
            return f", {ended.reason} (exit {ended.exit_code})"
    return ""


def _forward_again(forwards: list[Forward], new: Forward) -> socket.socket:
    """Keep `new` (closed with the session), close the reconnect before it, hand out its socket."""
    for old in forwards:
        old.close()
    forwards[:] = [new]
    return new.sock
