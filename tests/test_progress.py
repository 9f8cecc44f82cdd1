"""The status line of `run --target`, read from a real terminal, and the one-line failures of a start.

The emulator cannot port-forward, so every run here ends right after the agent is pinned,
with "cannot port-forward" as its one line of error: the status line must be gone by then.
"""
from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import asyncssh
import kmock

from kube_env import BAD_IMAGE, NODE, PODS, Api, FakeKubelet, api, eventually  # noqa: F401 - `api` is a fixture
from mirrord_tun.kube import manifest
from test_security_kube import fake_agents, jobs_gone, key_line, stop_agents

CLEAR = "\r\x1b[K"
STEPS = ["creating agent job…", f"scheduled on {NODE}…", f"pulling {manifest.DEFAULT_IMAGE}…",
         "agent starting…", "agent ready"]


def kubelet(api: Api, pull_seconds: float = 1.0) -> FakeKubelet:
    """A kubelet whose agent comes up (a stand-in process and its key line) after a visible pull."""
    start, stop = fake_agents(key_line(asyncssh.generate_private_key("ssh-ed25519")), delay=1.0)
    k = FakeKubelet(api.emu, start, stop)
    k.pull_seconds = pull_seconds
    return k.start()


def on_a_terminal(api: Api, *args: str, timeout: float = 90) -> tuple[int, str]:
    """`mirrord-ns run --kubeconfig K ARGS` with stderr on a pty; its exit status and all it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    try:
        p = subprocess.Popen(["ip", "netns", "exec", api.netns, sys.executable, "-m", "mirrord_tun", "run",
                              "--kubeconfig", api.kubeconfig, *args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:  # EIO: every holder of the terminal's other end is gone
                        break
                    if not chunk:
                        break
                    out += chunk
            return p.wait(30), out.decode(errors="replace")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def shown(out: str) -> list[str]:
    """The texts the status line showed, in order (each write starts with CLEAR)."""
    return [part.removeprefix("mirrord-ns: ") for part in out.split(CLEAR)[1:] if part]


def test_the_status_line_goes_through_the_steps_and_is_cleared(api: Api) -> None:
    k = kubelet(api)
    try:
        code, out = on_a_terminal(api, "--target", "pod/web", "--", "true")
    finally:
        stop_agents(k)
    assert code == 2, out
    texts = shown(out)
    assert [t for t in texts if t in STEPS] == STEPS, texts
    # Cleared before anything else is said: the error starts on an empty line, and only once.
    last = out.rindex("agent ready")
    rest = out[last + len("agent ready"):]
    assert rest.startswith(CLEAR) and rest.removeprefix(CLEAR).startswith("mirrord-ns: cannot port-forward"), rest
    assert rest.count("\n") == 1, rest
    # The steps came from watches, not from reading the lists again and again.
    watched = api.emu.run(lambda: {r.resource for r in api.emu.km if r.action == kmock.action.WATCH})
    assert {PODS, kmock.resource("v1/events"), kmock.resource("batch/v1/jobs")} <= watched
    assert eventually(lambda: jobs_gone(api))


def test_no_status_line_when_stderr_is_not_a_terminal(api: Api) -> None:
    k = kubelet(api, pull_seconds=0)
    try:
        r = api.cli("run", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(k)
    assert r.returncode == 2
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("mirrord-ns: cannot port-forward"), r.stderr


def test_quiet_silences_the_status_line(api: Api) -> None:
    k = kubelet(api, pull_seconds=0)
    try:
        code, out = on_a_terminal(api, "-q", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(k)
    assert code == 2
    assert CLEAR not in out and "creating agent job" not in out
    assert "cannot port-forward" in out  # errors are still said


def test_without_watch_rights_the_start_is_followed_by_reading(api: Api) -> None:
    """A role without `watch` (or a server without it): the pod and its Events are read instead."""
    for plural in ("v1/pods", "v1/events", "batch/v1/jobs"):
        api.emu.run(lambda p=plural: api.emu.forbid("watch", p, f"{p} watch is forbidden"))
    k = kubelet(api, pull_seconds=0)
    try:
        code, out = on_a_terminal(api, "-v", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(k)
    assert code == 2
    assert "cannot watch pods of job mirrord-ns-agent-" in out and "reading it every 0.5 s" in out
    assert "agent ready" in shown(out) and "cannot port-forward" in out


def one_line_failure(api: Api, *args: str) -> str:
    """Run on a terminal, expect exit 2 and one line of error after the cleared status line; return it."""
    code, out = on_a_terminal(api, "--target", "pod/web", *args, "--", "true")
    assert code == 2, out
    error = out.split(CLEAR)[-1]
    assert error.startswith("mirrord-ns: ") and error.count("\n") == 1, out
    assert eventually(lambda: jobs_gone(api))
    return error.strip()


def test_an_image_that_cannot_be_pulled(api: Api) -> None:
    kubelet(api, pull_seconds=0)
    error = one_line_failure(api, "--agent-image", BAD_IMAGE)
    assert error.startswith(f"mirrord-ns: agent image {BAD_IMAGE} cannot be pulled: ErrImagePull"), error
    assert "not found" in error and error.endswith("give --agent-image or --image-pull-secret")


def test_a_node_that_refuses_the_agent(api: Api) -> None:
    k = kubelet(api)
    k.node_refuses = ("OutOfcpu", "Pod was rejected: Node didn't have enough resource: cpu, requested: 100, "
                                  "used: 3950, capacity: 4000")
    error = one_line_failure(api)
    assert "failed: OutOfcpu Pod was rejected: Node didn't have enough resource: cpu" in error, error
    assert error.endswith(f"the agent must run on {NODE} (the target's node): check its taints/resources")


def test_a_pod_that_cannot_be_scheduled(api: Api) -> None:
    """A FailedScheduling Event about the pinned pod (what a scheduler that handles nodeName pods says)."""
    k = kubelet(api)

    def unschedulable(_ns: str, job: dict) -> None:
        k.handled.add(job["metadata"]["name"] + "-x7k2p")  # no kubelet takes it on

        def later() -> None:
            [pod] = [p for (_, name), p in api.emu.live(PODS).items() if name.endswith("-x7k2p")]
            api.emu.event(pod, "FailedScheduling", "0/1 nodes are available: 1 node(s) had untolerated taint "
                          "{dedicated: gpu}.", "Warning")
        api.emu.loop.call_later(0.5, later)
    k.on_job = unschedulable
    error = one_line_failure(api)
    assert "cannot be scheduled: 0/1 nodes are available: 1 node(s) had untolerated taint" in error, error
    assert error.endswith(f"the agent must run on {NODE} (the target's node): check its taints/resources")


def test_a_namespace_that_refuses_hostpid(api: Api) -> None:
    k = kubelet(api)
    k.refuse_pods = ('violates PodSecurity "baseline:latest": host namespaces (hostPID=true), non-default '
                     'capabilities (container "agent" must not include "NET_ADMIN" in securityContext.capabilities.add)')
    error = one_line_failure(api)
    assert 'refuses the agent\'s pod: violates PodSecurity "baseline:latest": host namespaces (hostPID=true)' \
        in error, error
    assert "the agent needs a namespace with Pod Security 'privileged'" in error


def test_a_hostile_event_cannot_drive_the_terminal(api: Api) -> None:
    """Whoever can create Events, or write an admission webhook's refusal, chooses this text: it
    reaches the status line and the error, never as escape sequences (retitle, clear, a link)."""
    k = kubelet(api)
    k.refuse_pods = ('violates PodSecurity "baseline:latest": '
                     '\x1b]0;owned\x07\x1b[2J\x1b]8;;http://evil/\x07click\r\x1b[1A')
    try:
        code, out = on_a_terminal(api, "--target", "pod/web", "--", "true")
    finally:
        stop_agents(k)
    assert code == 2, out
    ours = out.replace(CLEAR, "")  # the status line's own control sequence
    assert "\x1b" not in ours and "\x07" not in ours and "\r" not in ours.replace("\r\n", ""), repr(out)
    assert '"baseline:latest": ?]0;owned??[2J?]8;;http://evil/?click' in ours, repr(out)
