"""A real Kubernetes for the end-to-end tests: the single-node cluster of `scripts/cluster`
(brought up once per session, and down at its end if the session brought it up), or the
user's own cluster named by MIRRORD_NS_E2E_KUBECONFIG. Workloads are made with the admin
kubeconfig in namespaces the tests create and delete; `mirrord-ns` runs with the user's.

Variables (all optional):
  MIRRORD_NS_E2E=skip                  skip these tests (e.g. a quick local run)
  MIRRORD_NS_E2E_KUBECONFIG=FILE       an existing cluster's admin kubeconfig: no scripts/cluster
  MIRRORD_NS_E2E_USER_KUBECONFIG=FILE  what `mirrord-ns` uses (default: the admin one)
  MIRRORD_NS_E2E_AGENT_IMAGE=IMAGE     the agent image the nodes can pull (default mirrord-ns:dev)
  MIRRORD_NS_E2E_TESTAPP_IMAGE=IMAGE   a busybox image (default mirrord-ns-testapp:dev)
  MIRRORD_NS_E2E_KUBECTL=FILE          kubectl (default: scripts/cluster's, else on PATH)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster"
RUN_DIR = Path("/run/mirrord-ns-cluster")
CACHE_KUBECTL = Path("/var/cache/mirrord-ns/k8s-v1.37.2/bin/kubectl")
# Liveness bounds for a loaded 2-core machine, not speed checks.
READY_TIMEOUT = 180
SESSION_TIMEOUT = 240


@dataclass
class RealCluster:
    admin_kubeconfig: str
    user_kubeconfig: str
    agent_image: str
    testapp_image: str
    kubectl_path: str

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self.kubectl_path, "--kubeconfig", self.admin_kubeconfig, *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def mrd(self, *args: str, timeout: float = SESSION_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`mirrord-ns ARGS` as the user, to completion."""
        return subprocess.run(self.mrd_argv(*args), capture_output=True, text=True, timeout=timeout)

    def mrd_argv(self, command: str, *args: str, kubeconfig: str | None = None) -> list[str]:
        extra = ["--agent-image", self.agent_image] if command == "run" else []
        return [sys.executable, "-m", "mirrord_tun", command, "--kubeconfig", kubeconfig or self.user_kubeconfig,
                *extra, *args]


def eventually(check: Callable[[], object], timeout: float = 120, step: float = 1) -> object:
    """The first truthy result of check() within timeout (a liveness bound), else the last."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(step)


def _cluster_up() -> bool:
    """Bring scripts/cluster up; whether it was down before (then the fixture takes it down)."""
    was_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    r = subprocess.run([str(SCRIPT), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        if not was_up:  # a half-started cluster would stay behind the failed session
            subprocess.run([str(SCRIPT), "down"], capture_output=True, check=False)
        tail = "\n".join(r.stdout.strip().splitlines()[-15:])
        pytest.fail(f"scripts/cluster up failed (exit {r.returncode}); the real-cluster tests need it, or "
                    f"MIRRORD_NS_E2E_KUBECONFIG, or MIRRORD_NS_E2E=skip:\n{tail}", pytrace=False)
    return not was_up


# Per module, not per session: while up, the cluster's kubelet and kube-proxy keep changing the
# host's nft ruleset, which other modules (the Docker tests) check is left as they found it.
@pytest.fixture(scope="module")
def real_cluster() -> Iterator[RealCluster]:
    if os.environ.get("MIRRORD_NS_E2E") == "skip":
        pytest.skip("MIRRORD_NS_E2E=skip")
    if os.geteuid() != 0:
        pytest.skip("needs root (scripts/cluster, and `mirrord-ns run` itself)")
    given = os.environ.get("MIRRORD_NS_E2E_KUBECONFIG")
    ours = given is None and _cluster_up()
    admin = given or str(RUN_DIR / "admin.kubeconfig")
    kubectl = os.environ.get("MIRRORD_NS_E2E_KUBECTL") or (
        str(CACHE_KUBECTL) if CACHE_KUBECTL.exists() else shutil.which("kubectl") or "kubectl")
    try:
        yield RealCluster(
            admin_kubeconfig=admin,
            user_kubeconfig=os.environ.get("MIRRORD_NS_E2E_USER_KUBECONFIG") or (
                admin if given else str(RUN_DIR / "user.kubeconfig")),
            agent_image=os.environ.get("MIRRORD_NS_E2E_AGENT_IMAGE", "mirrord-ns:dev"),
            testapp_image=os.environ.get("MIRRORD_NS_E2E_TESTAPP_IMAGE", "mirrord-ns-testapp:dev"),
            kubectl_path=kubectl)
    finally:
        if ours:
            subprocess.run([str(SCRIPT), "down"], check=False)


def new_namespace(k: RealCluster, labels: dict[str, str] | None = None) -> str:
    name = f"mrd-e2e-{uuid.uuid4().hex[:8]}"
    k.kubectl("create", "namespace", name)
    if labels:
        k.kubectl("label", "namespace", name, *[f"{key}={value}" for key, value in labels.items()])
    return name


def delete_namespace(k: RealCluster, name: str) -> None:
    k.kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False, timeout=150)


def wait_ready(k: RealCluster, ns: str, selector: str) -> None:
    r = k.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod", "-l", selector,
                  f"--timeout={READY_TIMEOUT}s", check=False, timeout=READY_TIMEOUT + 30)
    if r.returncode != 0:
        pods = k.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
        events = k.kubectl("get", "events", "-n", ns, check=False).stdout[-3000:]
        raise AssertionError(f"pods {selector} in {ns} not ready: {r.stderr}\n{pods}\n{events}")


def agents_left(k: RealCluster, ns: str) -> list[str]:
    """The agent Jobs and pods still in the namespace (labelled with a session)."""
    r = k.kubectl("get", "jobs,pods", "-n", ns, "-l", "mirrord-ns/session", "-o", "name")
    return r.stdout.split()
