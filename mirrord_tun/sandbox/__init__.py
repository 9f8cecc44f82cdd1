"""A throwaway "cluster" built from network namespaces on this machine.

    laptop 198.19.0.1 ──(port-forward stand-in)── 198.19.0.2 node 198.18.0.1 ─┐ br0
        pod 198.18.0.10 (target; the agent's --netns)                        ├─ 198.18.0.0/24
        svc 198.18.0.20 (HTTP :80, iperf3)   dns 198.18.0.53   client .30    ┘

`Sandbox(ipv6=True)` makes the cluster dual-stack: every cluster host also gets
fd00:198:18::<its last IPv4 byte>/64 (ADDRS6), svc serves HTTP there too, the DNS
server answers AAAA and listens on both, and the pod's resolv.conf names only its
IPv6 address. The laptop and the node's uplink stay IPv4 only, as the default does.

The node plays the Kubernetes node: it holds the bridge, and the agent runs there
with `--netns` pointing at the pod, as an agent pod with hostPID would. The laptop
reaches only the node, never the cluster network. Used by `mirrord-ns demo`, the
tests and scripts/bench; everything it makes is named with one random prefix and
removed by `close()`, processes by PID. The temp dir records who owns the sandbox
(`owner`: PID and start time), so `mirrord-ns cleanup` can remove the sandboxes of
a `demo` that was killed (`remove_stale`) without touching a live one.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


from mirrord_tun.netns.exec import invoking_user

CLUSTER_PREFIX = 24
ADDRS = {"node": "198.18.0.1", "pod": "198.18.0.10", "svc": "198.18.0.20",
         "dns": "198.18.0.53", "client": "198.18.0.30"}
ADDRS6 = {role: f"fd00:198:18::{addr.rsplit('.', 1)[1]}" for role, addr in ADDRS.items()}
CLUSTER_PREFIX6 = 64
LAPTOP_ADDR, NODE_UPLINK = "198.19.0.1", "198.19.0.2"
AGENT_PORT = 2222
# A client that vanished keeps its session this long (the agent's default is 60 s): short, so that
# tests of killed clients see the cleanup well within their bounds.
SANDBOX_RESUME_TIMEOUT = 5
PREFIX = "mrds"
# Children run the installed package: -P keeps the current directory (perhaps the
# source tree, which lacks agent/ and netns/) off their sys.path.
PY = (sys.executable, "-P")
DOMAIN = "default.svc.cluster.local"
_SEARCH = f"search {DOMAIN} svc.cluster.local cluster.local\noptions ndots:5\n"
RESOLV_CONF = f"nameserver {ADDRS['dns']}\n{_SEARCH}"
RESOLV_CONF6 = f"nameserver {ADDRS6['dns']}\n{_SEARCH}"


@dataclass
class Keys:
    identity: str  # client private key
    identity_pub: str
    host_key: str  # agent private host key
    host_pub: str


class Sandbox:
    def __init__(self, prefix: str | None = None, ipv6: bool = False) -> None:
        self.prefix = prefix or f"{PREFIX}{secrets.token_hex(3)}"
        self.ipv6 = ipv6
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        self._made_etc_netns = False
        self.agent_address = f"{NODE_UPLINK}:{AGENT_PORT}"
        self.dir = tempfile.mkdtemp(prefix=f"{self.prefix}.")
        try:  # demo's SIGTERM arrives as KeyboardInterrupt, also while the keys are made
            os.chmod(self.dir, 0o755)
            with open(os.path.join(self.dir, OWNER_FILE), "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
            self.keys = _make_keys(self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    # --- naming
    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def netns_path(self, role: str) -> str:
        return f"/run/netns/{self.ns(role)}"

    # --- building
    def build(self) -> "Sandbox":
        try:
            for role in ("node", "pod", "svc", "dns", "client", "laptop"):
                if os.path.lexists(self.netns_path(role)):  # not ours: close() must leave it alone
                    raise RuntimeError(f"network namespace {self.ns(role)} exists already")
                # Listed first: a signal during `ip netns add` kills ip, which may have made it already.
                self.namespaces.append(self.ns(role))
                self._ip("netns", "add", self.ns(role))
                self._ip("-n", self.ns(role), "link", "set", "lo", "up")
                # A new namespace takes IPv4's conf from the host's (net.core.devconf_inherit_init_net=0):
                # on a host that forwards (Kubernetes, Docker) every host here would start as a router.
                self._ip("netns", "exec", self.ns(role), "sh", "-c", "echo 0 >/proc/sys/net/ipv4/ip_forward")
            node = self.ns("node")
            self._ip("-n", node, "link", "add", "br0", "type", "bridge")
            self._ip("-n", node, "addr", "add", f"{ADDRS['node']}/{CLUSTER_PREFIX}", "dev", "br0")
            self._add6(node, "node", "br0")
            self._ip("-n", node, "link", "set", "br0", "up")
            for role in ("pod", "svc", "dns", "client"):
                self._ip("-n", node, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0",
                         "netns", self.ns(role))
                self._ip("-n", node, "link", "set", f"v-{role}", "master", "br0", "up")
                self._ip("-n", self.ns(role), "addr", "add", f"{ADDRS[role]}/{CLUSTER_PREFIX}", "dev", "eth0")
                self._add6(self.ns(role), role, "eth0")
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
                f.write(RESOLV_CONF6 if self.ipv6 else RESOLV_CONF)
        except BaseException:
            self.close()
            raise
        return self

    def start_services(self) -> None:
        self.start_ready("svc", [*PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", "80", "svc"])
        if self.ipv6:
            self.start_ready("svc", [*PY, "-m", "mirrord_tun.sandbox.http_server", ADDRS6["svc"], "80", "svc"])
        zone = os.path.join(self.dir, "zone")
        _write_zone(zone, self.ipv6)
        hosts = f"{ADDRS['dns']},{ADDRS6['dns']}" if self.ipv6 else ADDRS["dns"]
        self.start_ready("dns", [*PY, "-m", "mirrord_tun.sandbox.dns_server", hosts, zone])

    def start_agent(self, *extra: str, wrap: tuple[str, ...] = (), resume_timeout: float = SANDBOX_RESUME_TIMEOUT,
                    listen: str | None = None, stderr: object = None) -> subprocess.Popen[bytes]:
        """Start the agent in the node namespace (`wrap`: a command prefix, e.g. to confine it;
        `stderr`: where its log goes, ours by default)."""
        return self.start_ready("node", [
            *wrap, *PY, "-m", "mirrord_tun", "agent", "--listen", listen or self.agent_address,
            "--authorized-key", self.keys.identity_pub, "--host-key", self.keys.host_key,
            "--netns", self.netns_path("pod"), "--resume-timeout", f"{resume_timeout:g}", *extra],
            ready="listening", stderr=stderr)

    def run_args(self, *command: str, verbose: int = 0) -> list[str]:
        """argv of `mirrord-ns run` from the laptop against this sandbox's agent (`verbose`: its -v count)."""
        return ["ip", "netns", "exec", self.ns("laptop"), *PY, "-m", "mirrord_tun", "run",
                *([f"-{'v' * verbose}"] if verbose else []), "--agent", self.agent_address,
                "--identity", self.keys.identity, "--agent-host-key", self.keys.host_pub, "--", *command]

    # --- processes
    def start(self, role: str, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        # A session of its own: a terminal hangup (closing `demo`'s window) must not kill
        # the sandbox's servers before close() stops them in order.
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], start_new_session=True,
                             **kw)  # type: ignore[call-overload]
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
        _remove(self.namespaces, self.dir, self._made_etc_netns)
        self.namespaces.clear()

    def __enter__(self) -> "Sandbox":
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers
    def _add6(self, namespace: str, role: str, dev: str) -> None:
        if self.ipv6:  # nodad: usable at once, as the IPv4 address is
            self._ip("-n", namespace, "addr", "add", f"{ADDRS6[role]}/{CLUSTER_PREFIX6}", "dev", dev, "nodad")

    def _ip(self, *args: str) -> None:
        p = subprocess.run(["ip", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _make_keys(directory: str) -> Keys:
    """A fresh client identity and agent host key in `directory`."""
    # Imported here: the sandbox's servers (http_server, recorder, ...) are programs of their
    # own that import this package, and asyncssh (with its dependencies' warnings) is not theirs.
    import asyncssh

    paths = {}
    for name in ("identity", "host_key"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        path = os.path.join(directory, name)
        key.write_private_key(path)
        os.chmod(path, 0o600)  # the folder is world-readable (the command's user reads it)
        if user := invoking_user():  # under sudo `run` reads --identity as that user: theirs
            os.chown(path, user.uid, user.gid)
        key.write_public_key(path + ".pub")
        paths[name] = path
    return Keys(paths["identity"], paths["identity"] + ".pub", paths["host_key"], paths["host_key"] + ".pub")


OWNER_FILE = "owner"


def _write_zone(path: str, ipv6: bool) -> None:
    """The sandbox DNS server's names: each service host under two domains."""
    with open(path, "w") as f:
        for role in ("svc", "pod", "client"):
            for name in (f"{role}.{DOMAIN}", f"{role}.svc.cluster.local"):
                f.write(f"{name} {ADDRS[role]}\n")
                if ipv6:
                    f.write(f"{name} {ADDRS6[role]}\n")


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the PID, names one process even after PID reuse."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _owner_alive(sandbox_dir: str) -> bool:
    try:
        with open(os.path.join(sandbox_dir, OWNER_FILE)) as f:
            owner = f.read().split()
    except FileNotFoundError:
        # The owner file is written right after the dir is made, and the dir goes last:
        # no file means a sandbox being made or removed this instant.
        return True
    try:
        return len(owner) == 2 and _start_time(int(owner[0])) == owner[1]
    except (OSError, ValueError):
        return False  # no such process any more


def remove_stale() -> list[str]:
    """Sandboxes whose owning process is gone: their namespaces, /etc/netns dirs, temp dir."""
    tmp = tempfile.gettempdir()
    dirs = {m[1]: os.path.join(tmp, d) for d in os.listdir(tmp) if (m := _SANDBOX_DIR.fullmatch(d))}
    removed: list[str] = []
    for prefix, path in sorted(dirs.items()):
        if not _ours(path) or _owner_alive(path):
            continue
        names = sorted({n for parent in ("/run/netns", "/etc/netns") for n in _listdir(parent)
                        if n.startswith(f"{prefix}-")})
        _remove(names, path, made_etc_netns=False)
        removed += [f"sandbox namespace {n}" for n in names] + [f"sandbox dir {path}"]
    return removed


def _ours(path: str) -> bool:
    """A real directory made by this user: anyone may create names in /tmp, and root must
    not tear down a live sandbox because someone planted a dir with a dead owner."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


_SANDBOX_DIR = re.compile(rf"({PREFIX}[0-9a-f]{{6}})\..+")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _remove(namespaces: list[str], sandbox_dir: str, made_etc_netns: bool) -> None:
    for name in namespaces:
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    if made_etc_netns:
        with contextlib.suppress(OSError):  # not empty: another sandbox (or someone) still uses it
            os.rmdir("/etc/netns")
    shutil.rmtree(sandbox_dir, ignore_errors=True)


def _kill_namespace_processes(name: str) -> None:
    """Processes a test started and lost track of, found by namespace (never by name)."""
    p = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
