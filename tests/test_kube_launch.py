"""The launcher's failure paths and `cleanup`, against kmock's emulator with a fake kubelet."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import asyncssh
from kubernetes import client

from kube_env import (BAD_IMAGE, JOBS, PODS, Api, FakeKubelet, api, eventually,  # noqa: F401 - `api` is a fixture
                      job_pod_metadata)
from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import describe


def ours(api: Api) -> dict:
    def pick() -> dict:
        return {k: v for res in (JOBS, PODS) for k, v in api.emu.live(res).items()
                if v["metadata"].get("labels", {}).get(manifest.LABEL_APP) == manifest.APP}
    return api.emu.run(pick)


def test_agent_image_pull_error_is_shown_and_the_agent_removed(api: Api) -> None:
    FakeKubelet(api.emu).start()
    began = time.monotonic()
    r = api.cli("run", "--target", "pod/web", "--agent-image", BAD_IMAGE, "--", "true")
    assert time.monotonic() - began < 60
    assert r.returncode == 2
    assert "ErrImagePull" in r.stderr and BAD_IMAGE in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert eventually(lambda: ours(api) == {})  # job deleted, and its pod with it


def test_forbidden_job_creation(api: Api) -> None:
    api.emu.run(lambda: api.emu.forbid("post", "batch/v1/jobs", 'jobs.batch is forbidden: User "dev" cannot '
                                       'create resource "jobs" in API group "batch"'))
    r = api.cli("run", "--target", "pod/web", "--", "true")
    assert r.returncode == 2
    assert "cannot create the agent job" in r.stderr and "forbidden: jobs.batch is forbidden" in r.stderr


def test_cleanup_removes_only_this_users_agents_and_never_a_running_one(api: Api) -> None:
    """The user label is this machine's user name, which another laptop's user may share: a Job
    whose agent runs is a live session (a teammate's, maybe) and stays."""
    def leftovers() -> None:
        for user, session, phase in (("root", "aaaa0001", "Pending"), ("someone-else", "bbbb0002", "Pending"),
                                     ("root", "cccc0003", "Running")):
            job = manifest.agent_job(session=session, user=user, namespace="default", image="agent:1",
                                     client_key="ssh-ed25519 AAAA", target=None, privileged=False)
            job["metadata"]["uid"] = f"uid-{session}"
            api.emu.put("batch/v1/jobs", job)
            # The running one's pod is its Job's, as the Job controller makes it; the others' are bare.
            meta = job_pod_metadata(job) if phase == "Running" else job["metadata"]
            api.emu.put("v1/pods", {"apiVersion": "v1", "kind": "Pod", "spec": job["spec"]["template"]["spec"],
                                    "status": {"phase": phase},
                                    "metadata": dict(meta, name=job["metadata"]["name"] + "-x", namespace="default")})
        # A pod of ours that no Job controls (its Job gone with --cascade=orphan), still running.
        api.emu.put("v1/pods", {"apiVersion": "v1", "kind": "Pod", "spec": job["spec"]["template"]["spec"],
                                "status": {"phase": "Running"},
                                "metadata": dict(job["metadata"], name="mirrord-ns-agent-orphan", uid="uid-o")})
    api.emu.run(leftovers)
    r = api.cli("cleanup")
    assert r.returncode == 0, r.stderr
    assert "removed job/default/mirrord-ns-agent-aaaa0001" in r.stdout
    assert "removed pod/default/mirrord-ns-agent-aaaa0001-x" in r.stdout
    left = ours(api)
    assert {name for _, name in left} == {"mirrord-ns-agent-bbbb0002", "mirrord-ns-agent-bbbb0002-x",
                                          "mirrord-ns-agent-cccc0003", "mirrord-ns-agent-cccc0003-x",
                                          "mirrord-ns-agent-orphan"}, r.stdout
    [kept] = [line for line in r.stderr.splitlines() if "its agent is running" in line]
    assert "job/default/mirrord-ns-agent-cccc0003" in kept and "pod/default/mirrord-ns-agent-orphan" in kept
    assert api.emu.run(lambda: ("default", "web") in api.emu.live(PODS))


def test_cleanup_without_a_cluster_is_safe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([sys.executable, "-m", "mirrord_tun", "cleanup", "--kubeconfig", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "skipping the cluster: no kubeconfig" in r.stderr


def test_sigterm_while_waiting_for_the_agent_deletes_it(api: Api) -> None:
    FakeKubelet(api.emu).start()  # no agent ever starts: the pod stays Pending
    p = subprocess.Popen(["ip", "netns", "exec", api.netns, sys.executable, "-m", "mirrord_tun", "run",
                          "--kubeconfig", api.kubeconfig, "--target", "pod/web", "--", "true"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ours(api) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ours(api), "no agent job was created"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 130
        assert eventually(lambda: ours(api) == {})
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_port_forward_failure_is_reported_and_the_agent_removed(api: Api) -> None:
    """The real client's portforward() is called; the emulator cannot upgrade to a websocket."""
    agents: list[subprocess.Popen[bytes]] = []

    def fake_agent(_args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
        agents.append(subprocess.Popen(["sleep", "60"]))
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        return agents[-1], f"mirrord-ns agent listening on 0.0.0.0:2222 netns /proc/1/ns/net host-key {key} (x)\n"

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait()

    FakeKubelet(api.emu, fake_agent, stop).start()
    try:
        r = api.cli("run", "--target", "pod/web", "--", "true")
        assert r.returncode == 2
        assert "cannot port-forward to pod/mirrord-ns-agent-" in r.stderr, r.stderr
        assert "instead of opening a websocket" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert eventually(lambda: ours(api) == {})
        deadline = time.monotonic() + 10
        while agents[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agents[0].poll() is not None  # the pod's deletion stopped the "agent"
    finally:
        for proc in agents:
            if proc.poll() is None:
                stop(proc)


def test_a_refused_port_forward_says_why() -> None:
    body = json.dumps({"kind": "Status", "message": 'pods "a" is forbidden: cannot create pods/portforward'})
    e = client.ApiException(status=0, reason=f"Handshake status 403 Forbidden -+-+- {{'x': 'y'}} -+-+- {body}")
    assert describe(e) == ('forbidden: pods "a" is forbidden: cannot create pods/portforward '
                           "(deploy/rbac.yaml lists the permissions mirrord-ns needs)")
