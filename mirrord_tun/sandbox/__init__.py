"""A throwaway "cluster" built from network namespaces on this machine.

    laptop 198.19.0.1 ──(port-forward stand-in)── 198.19.0.2 node 198.18.0.1 ─┐ br0
        pod 198.18.0.10 (target; the agent's --netns)                        ├─ 198.18.0.0/24
        svc 198.18.0.20 (HTTP :80, iperf3)   dns 198.18.0.53   client .30    ┘

The node plays the Kubernetes node: it holds the bridge, and the agent runs there
with `--netns` pointing at the pod, as an agent pod with hostPID would. The laptop
reaches only the node, never the cluster network. Used by `mirrord-ns demo`, the
tests and scripts/bench; everything it makes is named with one random prefix and
removed by `close()`, processes by PID.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import asyncssh

CLUSTER_PREFIX = 24
ADDRS = {"node": "198.18.0.1", "pod": "198.18.0.10", "svc": "198.18.0.20",
         "dns": "198.18.0.53", "client": "198.18.0.30"}
LAPTOP_ADDR, NODE_UPLINK = "198.19.0.1", "198.19.0.2"
AGENT_PORT = 2222
DOMAIN = "default.svc.cluster.local"
RESOLV_CONF = f"nameserver {ADDRS['dns']}\nsearch {DOMAIN} svc.cluster.local cluster.local\noptions ndots:5\n"


@dataclass
class Keys:
    identity: str  # client private key
    identity_pub: str
    host_key: str  # agent private host key
    host_pub: str


class Sandbox:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"mrds{secrets.token_hex(3)}"
        self.dir = tempfile.mkdtemp(prefix=f"{self.prefix}.")
        os.chmod(self.dir, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        self._made_etc_netns = False
        self.keys = self._make_keys()
        self.agent_address = f"{NODE_UPLINK}:{AGENT_PORT}"

    # --- naming
    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def netns_path(self, role: str) -> str:
        return f"/run/netns/{self.ns(role)}"

    # --- building
    def build(self) -> "Sandbox":
        try:
            for role in ("node", "pod", "svc", "dns", "client", "laptop"):
                self._ip("netns", "add", self.ns(role))
                self.namespaces.append(self.ns(role))
                self._ip("-n", self.ns(role), "link", "set", "lo", "up")
            node = self.ns("node")
            self._ip("-n", node, "link", "add", "br0", "type", "bridge")
            self._ip("-n", node, "addr", "add", f"{ADDRS['node']}/{CLUSTER_PREFIX}", "dev", "br0")
            self._ip("-n", node, "link", "set", "br0", "up")
            for role in ("pod", "svc", "dns", "client"):
                self._ip("-n", node, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0",
                         "netns", self.ns(role))
                self._ip("-n", node, "link", "set", f"v-{role}", "master", "br0", "up")
                self._ip("-n", self.ns(role), "addr", "add", f"{ADDRS[role]}/{CLUSTER_PREFIX}", "dev", "eth0")
                self._ip("-n", self.ns(role), "link", "set", "eth0", "up")
            self._ip("-n", node, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
                     "netns", self.ns("laptop"))
            self._ip("-n", node, "addr", "add", f"{NODE_UPLINK}/30", "dev", "uplink")
            self._ip("-n", node, "link", "set", "uplink", "up")
            self._ip("-n", self.ns("laptop"), "addr", "add", f"{LAPTOP_ADDR}/30", "dev", "eth0")
            self._ip("-n", self.ns("laptop"), "link", "set", "eth0", "up")
            # What `ip netns exec` shows processes in the pod as /etc/resolv.conf.
            self._made_etc_netns = not os.path.exists("/etc/netns")
            os.makedirs(f"/etc/netns/{self.ns('pod')}", exist_ok=True)
            with open(f"/etc/netns/{self.ns('pod')}/resolv.conf", "w") as f:
                f.write(RESOLV_CONF)
        except BaseException:
            self.close()
            raise
        return self

    def start_services(self) -> None:
        py = sys.executable
        self.start_ready("svc", [py, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", "80", "svc"])
        zone = os.path.join(self.dir, "zone")
        with open(zone, "w") as f:
            for role in ("svc", "pod", "client"):
                for name in (f"{role}.{DOMAIN}", f"{role}.svc.cluster.local"):
                    f.write(f"{name} {ADDRS[role]}\n")
        self.start_ready("dns", [py, "-m", "mirrord_tun.sandbox.dns_server", ADDRS["dns"], zone])

    def start_agent(self, *extra: str, wrap: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """Start the agent in the node namespace (`wrap`: a command prefix, e.g. to confine it)."""
        return self.start_ready("node", [
            *wrap, sys.executable, "-m", "mirrord_tun", "agent", "--listen", self.agent_address,
            "--authorized-key", self.keys.identity_pub, "--host-key", self.keys.host_key,
            "--netns", self.netns_path("pod"), *extra], ready="listening", stderr=None)

    def run_args(self, *command: str, verbose: bool = False) -> list[str]:
        """argv of `mirrord-ns run` from the laptop against this sandbox's agent."""
        return ["ip", "netns", "exec", self.ns("laptop"), sys.executable, "-m", "mirrord_tun", "run",
                *(["-v"] if verbose else []), "--agent", self.agent_address,
                "--identity", self.keys.identity, "--agent-host-key", self.keys.host_pub, "--", *command]

    # --- processes
    def start(self, role: str, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def start_ready(self, role: str, argv: list[str], ready: str = "ready", timeout: float = 15,
                    stderr: object = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        """Start a server and wait for the line saying it is ready."""
        p = self.start(role, argv, stdout=subprocess.PIPE, stderr=stderr)
        assert p.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(p.stdout.fileno(), True)
        line = p.stdout.readline().decode()
        if ready not in line or time.monotonic() > deadline:
            self.stop(p)
            raise RuntimeError(f"{argv[:4]} in {role} did not start: {line.strip()!r}")
        return p

    def exec(self, role: str, *argv: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(role), *argv], capture_output=True,
                              text=True, timeout=timeout, **kw)  # type: ignore[call-overload]

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 5) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()

    # --- teardown
    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()
        for name in self.namespaces:
            _kill_namespace_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        self.namespaces.clear()
        if self._made_etc_netns:
            with contextlib.suppress(OSError):  # not empty: another sandbox still uses it
                os.rmdir("/etc/netns")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers
    def _ip(self, *args: str) -> None:
        p = subprocess.run(["ip", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")

    def _make_keys(self) -> Keys:
        paths = {}
        for name in ("identity", "host_key"):
            key = asyncssh.generate_private_key("ssh-ed25519")
            path = os.path.join(self.dir, name)
            key.write_private_key(path)
            key.write_public_key(path + ".pub")
            paths[name] = path
        return Keys(paths["identity"], paths["identity"] + ".pub", paths["host_key"], paths["host_key"] + ".pub")


def _kill_namespace_processes(name: str) -> None:
    """Processes a test started and lost track of, found by namespace (never by name)."""
    p = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
