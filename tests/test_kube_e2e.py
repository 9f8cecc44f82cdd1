"""`run --target pod/web` end to end: the emulator for the API, a fake kubelet that starts
the real agent with the pod's own args in the sandbox's node namespace, the real `run`
in the laptop namespace (with --agent-address: the emulator cannot port-forward)."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from typing import Iterator

from kube_env import JOBS, PODS, SEEDED_PODS, KubeCluster, eventually, kube_cluster  # noqa: F401 - `kube_cluster` is a fixture
from mirrord_tun.agent.server import DEFAULT_RESUME_TIMEOUT as RESUME_TIMEOUT
from mirrord_tun.kube import manifest
from mirrord_tun.sandbox import ADDRS


def test_run_target_pod(kube_cluster: KubeCluster) -> None:
    k = kube_cluster
    shown = 'echo "env:$LITERAL:$FROM_CM:$FROM_SECRET:$CFG_KEY:$EXPANDED:$POD_NAME"'
    r = k.run("--target", "pod/web", "--agent-address", k.agent_address, "--env-exclude", "FROM_SECRET",
              "--", "sh", "-c", f"curl -s http://svc/; echo; {shown}")
    assert r.returncode == 0, r.stderr
    assert f"you are {ADDRS['pod']}" in r.stdout  # the service saw the pod's address
    assert "env:hello:fast::value:hello-world $(LITERAL):web" in r.stdout
    # The kubelet started the agent with the pod's args: found by container ID, not told a namespace.
    [args] = k.kubelet.started_args
    assert args[args.index("--container-id") + 1] == f"containerd://{k.container_id}"
    # Job deleted on the way out, its pod with it, and the agent stopped with them.
    assert eventually(lambda: k.emu.run(lambda: (k.emu.live(JOBS), k.emu.live(PODS).keys() - {
        ("default", n) for n in SEEDED_PODS})) == ({}, set()))
    deadline = time.monotonic() + 10
    while k.kubelet.agents and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not k.kubelet.agents


def test_exit_status_and_no_env(kube_cluster: KubeCluster) -> None:
    k = kube_cluster
    r = k.run("--target", "deploy/web", "--agent-address", k.agent_address, "--no-env",
              "--", "sh", "-c", 'test -z "$LITERAL" && exit 7')
    assert r.returncode == 7, r.stderr


def test_targetless_uses_the_agents_own_network(kube_cluster: KubeCluster) -> None:
    k = kube_cluster
    # By address: the node's resolver is this host's, which knows no sandbox names.
    r = k.run("--agent-address", k.agent_address, "--", "curl", "-s", f"http://{ADDRS['svc']}/")
    assert r.returncode == 0, r.stderr
    assert f"you are {ADDRS['node']}" in r.stdout  # the fake kubelet runs the agent in the node's namespace
    [args] = k.kubelet.started_args
    assert "--container-id" not in args


@contextlib.contextmanager
def session_running(k: KubeCluster) -> Iterator[subprocess.Popen[str]]:
    """`run --target pod/web` with a command that says it started and then waits."""
    p = subprocess.Popen(["ip", "netns", "exec", k.sb.ns("laptop"), sys.executable, "-m", "mirrord_tun", "run",
                          "--kubeconfig", k.kubeconfig, "--target", "pod/web", "--agent-address", k.agent_address,
                          "--", "sh", "-c", "echo started; exec sleep 60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "started\n"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_ctrl_c_ends_the_session_and_deletes_the_agent(kube_cluster: KubeCluster) -> None:
    k = kube_cluster
    with session_running(k) as p:
        # No terminal here, so `run` passes the signal on to the command, as a terminal would.
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    assert eventually(lambda: k.emu.run(lambda: (k.emu.live(JOBS), {
        name for _, name in k.emu.live(PODS) if name.startswith("mirrord-ns-agent")})) == ({}, set()))


def test_agent_exits_soon_after_its_client_dies(kube_cluster: KubeCluster) -> None:
    k = kube_cluster
    with session_running(k) as p:
        [agent] = k.kubelet.agents.values()
        p.kill()  # no cleanup at all: only the agent can notice
        began = time.monotonic()
        # It keeps the session for `run` to resume (the grace period), then leaves within
        # --idle-exit: the README's "grace + 15 s".
        bound = RESUME_TIMEOUT + manifest.IDLE_EXIT + 15
        agent.wait(bound + 10)
        assert time.monotonic() - began < bound
