"""docker-compose.test.yml end to end: a compose stack joined to the sidecar lives in the pod's network.

Drives the real thing: scripts/docker-up (Debian's Docker, started so that it leaves
the host alone), scripts/build-images (debootstrap base, no registry), `docker-compose
up`, assertions from inside the stack's containers, then `down` and scripts/docker-down,
also when an assertion fails. Skips only when this kernel cannot run Docker at all.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ["docker-compose", "-f", str(ROOT / "docker-compose.test.yml")]
DOCKER = "/usr/bin/docker"  # Debian's client, as scripts/docker-up installs it
POD, SVC, DNS_NAME = "198.18.201.10", "198.18.201.20", "svc.default.svc.cluster.local"
CLIENT = "198.18.201.30"  # sends requests to the pod, which the stack gets copies of
AGENT = "198.18.202.10"  # the agent's own address on the stack's network (as a port-forward would be)
PYTHON = "/opt/mirrord-ns/bin/python"  # the image's
UP_TIMEOUT, BUILD_TIMEOUT, SETTLE = 300, 900, 60
# The stack's subnets are fixed: two runs on one machine (one dockerd) take turns.
LOCK, LOCK_WAIT = "/run/lock/mirrord-ns-compose.lock", 900


def docker_unusable() -> str | None:
    """Why this machine cannot run Docker at all (None: it can). Anything else is a failure."""
    if os.geteuid() != 0:
        return "needs root (dockerd, network namespaces)"
    for need in ("/dev/net/tun",):
        if not os.path.exists(need):
            return f"no {need}"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read() and subprocess.run(["modprobe", "overlay"], capture_output=True).returncode:
            return "the kernel has no overlay filesystem (Docker's storage driver)"
    ns = f"mrdbr{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        if subprocess.run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"], capture_output=True).returncode:
            return "the kernel has no bridge support (Docker's networks)"
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    return None


def host_state() -> dict[str, str]:
    """What Docker must leave as it found it: the firewall, forwarding, the host's links."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout

    return {"nft": out("nft", "list", "ruleset"), "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
            "links": " ".join(sorted(line.split(":")[1].strip().split("@")[0]
                                     for line in out("ip", "-o", "link").splitlines()))}


def make_keys(folder: str) -> None:
    for name in ("client", "agent_host"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(f"{folder}/{name}")
        key.write_public_key(f"{folder}/{name}.pub")
        os.chmod(f"{folder}/{name}", 0o644)  # read by root in the containers; a throwaway key


class Stack:
    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.project, self.env = project, env

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*COMPOSE, "-p", self.project, *args], capture_output=True, text=True,
                           env=self.env, timeout=timeout, cwd=ROOT)
        if check:
            assert r.returncode == 0, f"docker-compose {' '.join(args)}: {r.stderr}"
        return r

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *argv, timeout=60, check=False)

    def container(self, service: str) -> str:
        # Compose v1 names it PROJECT_SERVICE_1, v2 PROJECT-SERVICE-1: ask instead of guessing.
        return self.compose("ps", "-q", service).stdout.strip()

    def pid(self, service: str) -> int:
        out = subprocess.run([DOCKER, "inspect", "-f", "{{.State.Pid}}", self.container(service)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    def curl_svc(self, service: str = "api", timeout: float = SETTLE) -> str:
        """curl svc from `service`, retrying while the sidecar (re)attaches."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.exec(service, "curl", "-sS", "-m", "3", "http://svc/")
            if r.returncode == 0 or time.monotonic() > deadline:
                return r.stdout + r.stderr
            time.sleep(0.5)


def take_turn() -> int:
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            assert time.monotonic() < deadline, f"another compose test held {LOCK} for {LOCK_WAIT} s"
            time.sleep(1)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = docker_unusable()
    if reason:
        pytest.skip(f"Docker cannot run on this machine: {reason}")
    turn = take_turn()  # released when this fd closes, at the end of the module
    before = host_state()
    keys = tempfile.mkdtemp(prefix="mrd-compose-keys.")
    os.chmod(keys, 0o755)
    env = dict(os.environ, MRD_KEYS=keys)
    st = Stack(f"mrdct{secrets.token_hex(3)}", env)
    try:
        t0 = time.monotonic()
        for script, limit in (("docker-up", UP_TIMEOUT), ("build-images", BUILD_TIMEOUT)):
            r = subprocess.run([str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=limit)
            assert r.returncode == 0, f"scripts/{script}: {r.stderr}"
        print(f"\ndocker-up and build-images: {time.monotonic() - t0:.1f} s")
        make_keys(keys)
        st.compose("up", "-d", timeout=180)
        yield st
    finally:
        st.compose("down", "-v", "-t", "2", "--remove-orphans", timeout=180, check=False)
        down = subprocess.run([str(ROOT / "scripts" / "docker-down")], capture_output=True, text=True, timeout=120)
        subprocess.run(["rm", "-rf", keys])
        os.close(turn)
    after = host_state()
    # docker0 comes and goes with a dockerd that docker-up started: gone once docker-down stopped
    # it, still there while another test holds a lease on it or when it was up before we came.
    if "stopped dockerd" in down.stderr:
        assert "docker0" not in after["links"].split()
    for state in (before, after):
        state["links"] = " ".join(n for n in state["links"].split() if n != "docker0")
    assert after == before, f"Docker left the host changed ({down.stderr.strip()})"


def test_the_stack_reaches_the_cluster_as_the_pod(stack: Stack) -> None:
    assert stack.curl_svc("api") == f"hello from svc, you are {POD}\n"
    assert stack.curl_svc("worker") == f"hello from svc, you are {POD}\n"
    # The worker's own loop (its log) got there too, by name: at one of its turns (every 2 s or
    # so; a turn from before the tunnel was up may have timed out, so not necessarily yet).
    def logged() -> bool:
        return f"you are {POD}" in stack.compose("logs", "--no-color", "worker").stdout
    assert wait_until(logged, SETTLE, 0.5), stack.compose("logs", "--no-color", "worker").stdout


def test_dns_is_the_pods(stack: Stack) -> None:
    r = stack.exec("worker", "getent", "hosts", "svc")
    assert r.stdout.split() == [SVC, DNS_NAME], r.stderr


def test_the_stack_still_talks_to_itself(stack: Stack) -> None:
    assert stack.exec("worker", "curl", "-sS", "-m", "5", "http://localhost:8080/").stdout == \
        "hello from api, you are 127.0.0.1\n"


def test_the_stack_gets_copies_of_the_pods_inbound_traffic(stack: Stack) -> None:
    """The client sends POSTs to the pod, which answers them; the stack's recorder gets each body
    byte-identical (its SHA-256) from the client's address: the sidecar mirrors inbound too."""
    def post(count: int, max_body: int, seed: int, path: str = "/") -> list[dict[str, object]]:
        r = stack.exec("client", PYTHON, "-m", "mirrord_tun.sandbox.loadgen", f"http://{POD}:80{path}",
                       str(count), "5", str(max_body), str(seed))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["results"]  # type: ignore[no-any-return]

    def records() -> list[dict[str, object]]:
        out = stack.exec("recorder", "cat", "/tmp/records.jsonl").stdout
        return [json.loads(line) for line in out.splitlines()]

    def probed() -> bool:  # until the sidecar learned the port and the agent's filter is set
        post(1, 16, 0, "/probe")
        return any(r["path"] == "/probe" for r in records())

    assert wait_until(probed, SETTLE)
    results = post(20, 1_000_000, 1)
    assert all(r["status"] == 200 and r["answer"] == f"{r['sha']} from {CLIENT}" for r in results), results

    def copies() -> list[dict[str, object]]:
        return [r for r in records() if r["path"] != "/probe"]

    assert wait_until(lambda: len(copies()) >= len(results), SETTLE)
    assert sorted(str(r["sha"]) for r in copies()) == sorted(str(r["sha"]) for r in results)
    assert {r["peer"] for r in copies()} == {CLIENT} and all(r["complete"] for r in copies())


def test_svc_is_not_reachable_without_the_tunnel(stack: Stack) -> None:
    """A container on the stack's network but outside the sidecar's namespace gets nowhere."""
    image = stack.env.get("MIRRORD_NS_IMAGE", "mirrord-ns:dev")
    r = subprocess.run([DOCKER, "run", "--rm", "--network", f"{stack.project}_uplink", "--entrypoint", "curl",
                        image, "-sS", "-m", "3", f"http://{SVC}/"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "you are" not in r.stdout


def test_joined_services_survive_sidecar_restarts(stack: Stack) -> None:
    """Restarted or killed, the sidecar joins the same namespace again; api and worker keep running."""
    pids = {s: stack.pid(s) for s in ("api", "worker", "mirrord")}
    stack.compose("restart", "-t", "5", "mirrord-tunnel")
    assert stack.curl_svc("api") == f"hello from svc, you are {POD}\n"
    os.kill(stack.pid("mirrord-tunnel"), signal.SIGKILL)  # a crash: the restart policy brings it back
    assert stack.curl_svc("worker") == f"hello from svc, you are {POD}\n"
    assert {s: stack.pid(s) for s in pids} == pids


def test_sidecar_reattaches_when_the_agent_restarts(stack: Stack) -> None:
    stack.compose("restart", "-t", "2", "agent")
    assert stack.curl_svc("api") == f"hello from svc, you are {POD}\n"


def test_stopping_the_sidecar_restores_the_namespace(stack: Stack) -> None:
    """Routes and resolv.conf of the shared namespace are as Docker made them once the sidecar stops."""
    holder = stack.pid("mirrord")
    stack.compose("stop", "-t", "10", "mirrord-tunnel")

    def net(*argv: str) -> str:
        return subprocess.run(["nsenter", "-t", str(holder), "-n", *argv], capture_output=True, text=True).stdout

    routes = net("ip", "route", "show", "table", "all")
    assert "mrd0" not in routes and "proto 77" not in routes, routes
    # The mirror's pod address on lo, its rule and its nft table are gone too.
    assert POD not in net("ip", "addr"), net("ip", "addr")
    assert net("ip", "rule").splitlines() == ["0:\tfrom all lookup local", "32766:\tfrom all lookup main",
                                              "32767:\tfrom all lookup default"], net("ip", "rule")
    assert "mirrord_ns" not in net("nft", "list", "ruleset")  # Docker's own DNS table stays
    resolv = stack.exec("api", "cat", "/etc/resolv.conf").stdout
    assert "mirrord-ns" not in resolv and "nameserver 127.0.0.11" in resolv, resolv
    stack.compose("start", "mirrord-tunnel")
    assert stack.curl_svc("api") == f"hello from svc, you are {POD}\n"


def test_attach_a_running_container_and_restore_it(stack: Stack) -> None:
    """`attach --container` from the host: a plain container joins the pod's network, then is given back."""
    image = stack.env.get("MIRRORD_NS_IMAGE", "mirrord-ns:dev")
    name = f"{stack.project}_plain"
    subprocess.run([DOCKER, "run", "-d", "--name", name, "--network", f"{stack.project}_uplink", image,
                    "sidecar", "--hold"], capture_output=True, check=True, timeout=60)
    attach: subprocess.Popen[str] | None = None
    try:
        pid = int(subprocess.run([DOCKER, "inspect", "-f", "{{.State.Pid}}", name], capture_output=True,
                                 text=True, check=True).stdout)

        def state() -> list[str]:
            net = [subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", *what], capture_output=True,
                                  text=True).stdout for what in (["addr"], ["route", "show", "table", "all"],
                                                                  ["link"], ["rule"])]
            # The mirror's table: gone again after (-s: Docker's DNS rules count packets meanwhile).
            nft = subprocess.run(["nsenter", "-t", str(pid), "-n", "nft", "-s", "list", "ruleset"],
                                 capture_output=True, text=True).stdout
            return [*net, nft, Path(f"/proc/{pid}/root/etc/resolv.conf").read_text()]

        before = state()
        keys = stack.env["MRD_KEYS"]
        attach = subprocess.Popen(
            [sys.executable, "-m", "mirrord_tun", "attach", "--container", name, "--agent", f"{AGENT}:2222",
             "--identity", f"{keys}/client", "--agent-host-key", f"{keys}/agent_host.pub"],
            stderr=subprocess.PIPE, text=True)
        assert attach.stderr is not None
        line = attach.stderr.readline()
        assert "in the pod's network" in line, line
        curl = subprocess.run([DOCKER, "exec", name, "curl", "-sS", "-m", "10", "http://svc/"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout == f"hello from svc, you are {POD}\n", curl.stderr
        attach.send_signal(signal.SIGINT)
        assert attach.wait(30) == 0
        assert state() == before
    finally:
        if attach is not None and attach.poll() is None:
            attach.kill()
            attach.wait()
        subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, timeout=60)
