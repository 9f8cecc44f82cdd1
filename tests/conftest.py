"""Fixtures and helpers: throwaway namespace "clusters" with the real agent in them.

Every test that touches the network builds its topology with `mirrord_tun.sandbox.Sandbox`
(namespaces + veth on 198.18.0.0/15, tunnel addresses from 100.64.0.0/10) and talks
to it through the real `mirrord-ns run` and real clients; nothing on the packet path is
mocked. Whatever a test starts is registered with its Sandbox, and `Sandbox.close()`
removes it even when the test fails. Processes are only ever signalled by PID.

Test modules import the helpers below with `from conftest import ...` (pytest puts
tests/ on sys.path because it has no __init__.py).
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import asyncssh
import pytest

from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns.namespace import pids_in as pids_in_netns  # noqa: F401 (tests import it from here)
from mirrord_tun.sandbox import ADDRS, Sandbox

# Whoever ran `sudo ./scripts/test` (root in CI, a person on a laptop), the suite sees
# the same thing: tests that want a sudo user set these variables themselves.
for _var in [v for v in os.environ if v.startswith("SUDO_")]:
    del os.environ[_var]

POD, SVC = ADDRS["pod"], ADDRS["svc"]
# The command as users start it: the installed console script, and as demo's children do.
INSTALLED = [str(Path(sys.executable).parent / "mirrord-ns")]
MIRRORD_NS = [sys.executable, "-m", "mirrord_tun"]


def key_pair(directory: Path) -> tuple[str, str]:
    """A client identity and a pinned agent host key (the public half) in `directory`."""
    identity, host = directory / "id", directory / "host.pub"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(identity))
    asyncssh.generate_private_key("ssh-ed25519").write_public_key(str(host))
    return str(identity), str(host)
UDP_ECHO_PORT = 7
# Liveness bounds, not speed checks: long enough for a loaded 2-core machine.
RUN_TIMEOUT = 60
CLEAN_TIMEOUT = 20

# A UDP echo service for the svc namespace (the sandbox itself only serves HTTP and DNS).
_UDP_ECHO = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {UDP_ECHO_PORT}))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""


@dataclass
class Cluster:
    """A built sandbox plus the agent process started in it (the guard; the worker is its child)."""

    sb: Sandbox
    agent: subprocess.Popen[bytes]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Namespaces, TUNs and nft need root; the pure protocol tests do not.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, TUN, nft)")
    for item in items:
        if {"cluster", "fresh_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


def make_cluster(agent_wrap: tuple[str, ...] = (), ipv6: bool = False,
                 more_on_svc: list[str] | None = None, agent_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """Build a cluster (dual-stack with `ipv6`), yield it, remove it; `agent_wrap` prefixes the
    agent's command line, `agent_args` are more options for it, `more_on_svc` is one more server
    for svc (it prints "ready")."""
    sb = Sandbox(ipv6=ipv6)
    try:
        sb.build()
        sb.start_services()
        sb.start_ready("svc", [sys.executable, "-c", _UDP_ECHO])
        if more_on_svc:
            sb.start_ready("svc", more_on_svc)
        yield Cluster(sb, sb.start_agent(*agent_args, wrap=agent_wrap))
    finally:
        sb.close()


@pytest.fixture
def private_ns() -> Iterator[NetNs]:
    """A network namespace of the test's own with `lo` up, gone with the test (its fd and thread);
    tests put what they need in it with `private_ns.call`."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    n = NetNs.new()
    try:
        n.call(subprocess.check_call, ["ip", "link", "set", "lo", "up"])
        yield n
    finally:
        n.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """One shared cluster for every test that leaves the agent running and the pod clean."""
    yield from make_cluster()


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    """A cluster of its own, for tests that kill or replace the agent."""
    yield from make_cluster()


# --- running `mirrord-ns run`

def run_env(**extra: str) -> dict[str, str]:
    """Our environment without sudo's variables (the suite may itself run under sudo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    env.update(extra)
    return env


def run_argv(sb: Sandbox, *command: str, verbose: bool = False, agent: str | None = None,
             identity: str | None = None, host_key: str | None = None) -> list[str]:
    """`sb.run_args(...)` with the connection options optionally replaced (error tests)."""
    argv = sb.run_args(*command, verbose=verbose)
    for flag, value in (("--agent", agent), ("--identity", identity), ("--agent-host-key", host_key)):
        if value is not None:
            argv[argv.index(flag) + 1] = value
    return argv


def mrd_run(sb: Sandbox, *command: str, verbose: bool = False, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = RUN_TIMEOUT, **opts: str) -> subprocess.CompletedProcess[str]:
    """Run `mirrord-ns run -- command` from the laptop namespace and wait for it."""
    argv = run_argv(sb, *command, verbose=verbose, **opts)
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env or run_env())
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first, unlike subprocess.run's SIGKILL: run then reaps its namespace, which
        # no sandbox cleanup could find afterwards.
        sb.stop(p)  # type: ignore[arg-type]
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def start_run(sb: Sandbox, *command: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[bytes]:
    """Start `mirrord-ns run` in the background; the sandbox stops it (by PID) on close."""
    kw: dict[str, object] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kw.update(popen)
    p = subprocess.Popen(sb.run_args(*command), env=env or run_env(), **kw)  # type: ignore[call-overload]
    sb.procs.append(p)
    return p


def read_line(p: subprocess.Popen[bytes], timeout: float = RUN_TIMEOUT) -> str:
    """The next stdout line of `p`, failing (not hanging) if none comes in time; "" at its end.
    Byte by byte from the fd: a buffered readline may take two lines at once, and select would
    then not see the second one, which waits in the buffer."""
    assert p.stdout is not None
    fd, line, deadline = p.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no output from {p.args[-1]!r} within {timeout} s"
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode()


def finish(p: subprocess.Popen[bytes], timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    """Wait for a started run; returns (exit code, rest of stdout, stderr)."""
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode(), err.decode()


# --- what a session may leave behind

def leftovers(sb: Sandbox) -> list[str]:
    """Session state still in the pod namespace: mrd* links, mirrord_ns_ tables, ip_forward=1."""
    pod = sb.ns("pod")
    found: list[str] = []
    links = subprocess.run(["ip", "-n", pod, "-j", "link", "show"], capture_output=True, text=True, check=True)
    found += [f"link {l['ifname']}" for l in json.loads(links.stdout) if l["ifname"].startswith("mrd")]
    tables = sb.exec("pod", "nft", "list", "tables")
    assert tables.returncode == 0, tables.stderr
    found += [line for line in tables.stdout.splitlines() if "mirrord_ns_" in line]
    for knob in ("ip_forward", "conf/eth0/forwarding"):
        fwd = sb.exec("pod", "cat", f"/proc/sys/net/ipv4/{knob}").stdout.strip()
        if fwd != "0":  # the sandbox starts the pod with 0; the agent must put that back
            found.append(f"{knob}={fwd}")
    return found


def local_dropped(err: str) -> dict[str, int]:
    """The counters `run -v`'s closing line names as dropped ("dropped: 2 spoofed, 1 ipv6"), by name."""
    m = re.search(r"^mirrord-ns: local: .* dropped: (.*)$", err, re.M)
    assert m, f"no counters in run's output:\n{err}"
    if m[1] == "none":
        return {}
    return {"dropped_" + reason.replace(" ", "_"): int(n)
            for n, reason in (part.split(" ", 1) for part in m[1].split(", "))}


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def assert_clean(sb: Sandbox, timeout: float = CLEAN_TIMEOUT) -> None:
    """The agent tears a session down asynchronously after the client leaves: poll for it."""
    wait_until(lambda: not leftovers(sb), timeout)
    assert leftovers(sb) == []


def pid_alive(pid: int) -> bool:
    """True for a running process (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture
def nobody_identity(cluster: Cluster) -> Iterator[None]:
    """The sandbox's client key owned by nobody for one test: `run` under SUDO_UID=65534 reads
    --identity with nobody's rights, as a real user's run reads their own key."""
    os.chown(cluster.sb.keys.identity, 65534, 65534)
    try:
        yield
    finally:
        os.chown(cluster.sb.keys.identity, 0, 0)
