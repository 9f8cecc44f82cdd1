"""Steal end to end: the pod's clients answered by the program under `run --steal`, and the port
always given back.

The client namespace (198.18.0.30) calls the pod (198.18.0.10), which serves HTTP on
80 and 8080 and echoes UDP on 7 itself. The program under `run --steal` serves HTTP on
80 and answers "hello from local, you are ADDR", so every answer says who served it
and which client address the server saw. Give-back times are printed (run with -s);
the only bounds are liveness bounds for a loaded 2-core machine.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import (_UDP_ECHO, UDP_ECHO_PORT, children, kill_pids, leftovers, pid_alive, read_line, run_env,
                      start_run, wait_until)
from test_attach import ATTACH_TIMEOUT, make_app, snapshot
from test_resume import RELAY_PORT, kill, start_relay

from mirrord_tun import protocol
from mirrord_tun.agent.steal.rules import Registry
from mirrord_tun.sandbox import ADDRS, LAPTOP_ADDR, PY, Sandbox


POD, CLIENT, OTHER = ADDRS["pod"], ADDRS["client"], ADDRS["svc"]  # svc's namespace plays a second client
HTTP, OTHER_PORT = 80, 8080
RESUME_GRACE = 20  # seconds: the agent keeps a dropped session this long (well past the outage)
LIVENESS = 30  # seconds: the issue asks for 1 s (signals) and 15 s (every agent killed); this is a hang check
TUNNEL_NET = "100.64.0.0/10"
HTTP_SERVER = [*PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0"]

# The program's UDP side: answers "local:" + the datagram, from the port it was sent to.
_UDP_LOCAL = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {UDP_ECHO_PORT}))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"local:" + data, peer)
"""
# Listens on HTTP, prints "ready <tunnel address> <pid>", serves nothing (the hostile-agent test).
_LISTENER = f"""
import os, socket, time
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("{OTHER}", 9))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {HTTP}))
s.listen(16)
print("ready", probe.getsockname()[0], os.getpid(), flush=True)
time.sleep(300)
"""
# Connects to ADDR:PORT and says how it went: "reached", "TimeoutError", "ConnectionRefusedError"...
_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("reached")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN, nft)")
    box = Sandbox()
    try:
        box.build()
        for port, name in ((HTTP, "pod"), (OTHER_PORT, "pod8080")):
            box.start_ready("pod", [*HTTP_SERVER, str(port), name])
        box.start_ready("pod", [sys.executable, "-c", _UDP_ECHO])
        yield box
    finally:
        box.close()


class Agent:
    """The agent (its guard process; the worker is the guard's child), restartable after kills."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.guard = sb.start_agent()

    def worker(self) -> int:
        assert wait_until(lambda: bool(children(self.guard.pid)), 10)
        return children(self.guard.pid)[0]

    def restart(self) -> None:
        self.sb.stop(self.guard)
        self.guard = self.sb.start_agent()


@pytest.fixture
def agent(sb: Sandbox) -> Iterator[Agent]:
    a = Agent(sb)
    try:
        yield a
        a.restart()  # a new agent removes what a killed one left
        assert wait_until(lambda: not leftovers(sb), LIVENESS), leftovers(sb)
    finally:
        sb.stop(a.guard)


class Run:
    """`mirrord-ns run -v --steal [OPTIONS] -- CMD` in the background (stderr to a file)."""

    def __init__(self, sb: Sandbox, command: list[str], *options: str, name: str = "run",
                 agent: str | None = None) -> None:
        self.sb = sb
        argv = sb.run_args(*command, verbose=True)
        if agent:
            argv[argv.index("--agent") + 1] = agent
        argv[argv.index("--"):argv.index("--")] = ["--steal", *options]
        self.stderr_path = Path(sb.dir) / f"{name}-{os.urandom(3).hex()}.stderr"
        self.stderr = open(self.stderr_path, "w+")
        self.proc = subprocess.Popen(argv, env=run_env(), stdout=subprocess.PIPE, stderr=self.stderr)
        sb.procs.append(self.proc)

    def log(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        """kill -9 of run; then of the command it leaves behind in its namespace."""
        left = _descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(LIVENESS)
        kill_pids(left)

    def close(self) -> None:
        self.sb.stop(self.proc)
        self.stderr.close()


def _descendants(pid: int) -> list[int]:
    return [d for c in children(pid) for d in [c, *_descendants(c)]]


@pytest.fixture
def runs(sb: Sandbox) -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for r in made:
        r.close()


def get(sb: Sandbox, port: int = HTTP, role: str = "client", host: str = POD) -> str:
    url_host = f"[{host}]" if ":" in host else host
    r = sb.exec(role, "curl", "-gsS", "--max-time", "3", f"http://{url_host}:{port}/")
    return r.stdout.strip() if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def udp(sb: Sandbox, data: str, host: str = POD) -> str:
    family = "AF_INET6" if ":" in host else "AF_INET"
    code = (f"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.settimeout(2); "
            f"s.sendto({data.encode()!r}, ('{host}', {UDP_ECHO_PORT}))\ntry: print(s.recv(100).decode())\n"
            "except OSError as e: print(type(e).__name__)")
    return sb.exec("client", sys.executable, "-c", code).stdout.strip()


def steal_http(sb: Sandbox, runs: list[Run], *options: str, port: int = HTTP, name: str = "run",
               agent: str | None = None, server: list[str] = HTTP_SERVER) -> Run:
    """A program (`server` ADDR) serving HTTP on `port` under run --steal, once the pod's clients reach it."""
    r = Run(sb, [*server, str(port), "local"], *options, name=name, agent=agent)
    runs.append(r)
    assert wait_until(lambda: get(sb).startswith("hello from local"), LIVENESS, 0.2), r.log()
    return r


def given_back_after(sb: Sandbox, start: float, what: str, ask: Callable[[], str] | None = None,
                     client: str = CLIENT) -> float:
    """Seconds from `start` until a new connection reaches the pod's own server again (`ask`:
    the request that must, a plain GET by default, from `client`); printed."""
    ask = ask or (lambda: get(sb))
    assert wait_until(lambda: ask() == f"hello from pod, you are {client}", LIVENESS, 0.05), \
        f"the pod did not get port {HTTP} back within {LIVENESS} s after {what}: {ask()}"
    took = time.monotonic() - start
    print(f"\nport given back {took:.2f} s after {what}")
    return took


def kill_every_agent_process(sb: Sandbox, agent: Agent, ask: Callable[[], str] | None = None,
                             client: str = CLIENT) -> float:
    """kill -9 of the guard and the worker, so nobody is left to remove the rules; seconds until
    the pod has its port back (the dead-man switch)."""
    worker = agent.worker()
    start = time.monotonic()
    kill_pids([agent.guard.pid])  # the guard first, or it would clean up after the worker
    kill_pids([worker])
    assert wait_until(lambda: not pid_alive(worker), 10)
    return given_back_after(sb, start, "kill -9 of every agent process (dead-man switch)", ask, client)


def pod_counter(sb: Sandbox) -> int:
    out = sb.exec("pod", "nft", "list", "table", "ip", "steal_test").stdout
    return int(out.split("packets", 1)[1].split()[0])


# --- the wire and the registry

def test_steal_bodies_are_checked() -> None:
    ok = protocol.StealRequest({80: 8080}, {53: 5353}, ("198.18.0.0/24", "fd00::/8"),
                               (protocol.FilteredSteal(81, 8081, "x-user: me", None),))
    assert protocol.parse_steal(protocol.steal(ok)[5:]) == ok
    for bad in ({"tcp": {"0": 1}}, {"tcp": {"80": 65536}}, {"tcp": {"080": 1}}, {"tcp": {"80": True}},
                {"tcp": [80]}, {"udp": {str(p): p for p in range(1, protocol.MAX_PORTS + 2)}},
                {"exclude": ["10.0.0.300/8"]}, {"exclude": ["fe80::1%eth0"]}, {"exclude": "10.0.0.0/8"},
                {"exclude": ["10.0.0.0/8"] * (protocol.MAX_EXCLUDE + 1)},
                {"filtered": [{"port": 80, "local": 80, "header": "("}]},
                {"filtered": [{"port": 80, "local": 80}]}, {"filtered": [{"port": 80, "header": "a"}]}):
        with pytest.raises(protocol.Malformed):
            protocol.parse_steal(json.dumps(bad).encode())
    state = protocol.StealState.from_json({"stolen": ["tcp/80"], "refused": {"udp/53": "x" * 5000}})
    assert state.refused["udp/53"] == "x" * protocol.MAX_REASON
    for bad_state in ({"stolen": ["tcp/0"], "refused": {}}, {"stolen": ["sctp/80"], "refused": {}},
                      {"stolen": [], "refused": {"tcp/80": 1}}, {"stolen": "tcp/80", "refused": {}}):
        with pytest.raises(protocol.Malformed):
            protocol.StealState.from_json(bad_state)


_ports = st.sampled_from(["80", "0", "65536", "080", "1", "x"]) | st.text(max_size=6)
_values = st.integers(-1, 70_000) | st.booleans() | st.none() | st.text(max_size=6)
_patterns = st.sampled_from(["x-user: me", "(", "a{99999999999}", "(?i", "", "[a-"]) | st.text(max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={
    "tcp": st.dictionaries(_ports, _values, max_size=4) | _values,
    "udp": st.dictionaries(_ports, _values, max_size=4) | st.lists(_values, max_size=3),
    "exclude": st.lists(st.sampled_from(["10.0.0.0/8", "1.2.3.4", "fd00::/8", "1.2.3.4/33", "", "0/0",
                                         "fe80::1%eth0", "fd00::1/129"])
                        | st.text(max_size=20) | _values, max_size=4) | _values,
    "filtered": st.lists(st.fixed_dictionaries({}, optional={
        "port": _values, "local": _values, "header": _patterns | _values, "path": _patterns | _values,
    }) | _values, max_size=3) | _values,
}))
def test_any_steal_body_parses_or_is_malformed(d: dict[str, object]) -> None:
    try:
        req = protocol.StealRequest.from_json(d)
    except protocol.Malformed:
        return
    for ports in (req.tcp, req.udp):
        assert all(type(p) is int and 0 < p < 65536 for pair in ports.items() for p in pair)
    assert all(ipaddress.ip_network(c) and "%" not in c for c in req.exclude)
    assert all(f.header is not None or f.path is not None for f in req.filtered)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"stolen": st.lists(st.sampled_from(["tcp/80", "udp/1", "tcp/0", "tcp/99999", "x"])
                                                 | _values, max_size=3) | _values,
                              "refused": st.dictionaries(st.sampled_from(["tcp/80", "udp/65535", "tcp/65536"])
                                                         | st.text(max_size=6), _values, max_size=3) | _values}))
def test_any_steal_state_parses_or_is_malformed(d: dict[str, object]) -> None:
    try:
        state = protocol.StealState.from_json(d)
    except protocol.Malformed:
        return
    assert all(0 < int(name.split("/")[1]) < 65536 for name in [*state.stolen, *state.refused])


def test_the_registry_shares_a_port_only_between_filters() -> None:
    reg = Registry()
    assert reg.claim("a", {"tcp/80", "udp/53"}, set()) == {}
    assert reg.claim("b", {"tcp/80", "tcp/81"}, set()) == {"tcp/80": "tcp port 80 is already stolen by session a"}
    assert reg.claim("c", set(), {80, 82}) == {"tcp/80": "tcp port 80 is already stolen by session a"}
    assert reg.claim("d", set(), {82}) == {}  # two filtered sessions on one port
    assert reg.claim("e", {"tcp/82"}, set()) == {"tcp/82": "tcp port 82 has filtered steals by session c"}
    reg.release("a")
    assert reg.claim("b", {"tcp/80", "udp/53"}, set()) == {}


# --- stealing

def test_every_request_reaches_the_program_with_the_clients_address(sb: Sandbox, agent: Agent,
                                                                    runs: list[Run]) -> None:
    steal_http(sb, runs)
    # Counts what the pod's own stack receives on port 80 (its server's only way in).
    script = ("table ip steal_test {\n chain input {\n  type filter hook input priority -10; policy accept;\n"
              f"  tcp dport {HTTP} counter\n }}\n}}\n")
    assert sb.exec("pod", "nft", "-f", "-", input=script).returncode == 0
    try:
        answers = [get(sb) for _ in range(20)]
        assert answers == [f"hello from local, you are {CLIENT}"] * 20
        assert pod_counter(sb) == 0
        assert get(sb, OTHER_PORT) == f"hello from pod8080, you are {CLIENT}"  # other ports untouched
    finally:
        sb.exec("pod", "nft", "delete", "table", "ip", "steal_test")


def test_a_port_the_pod_does_not_serve_onto_another_local_port(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    assert get(sb, 9090).startswith("curl failed")
    r = Run(sb, [*HTTP_SERVER, "9091", "local"], "--port", "9091:9090")
    runs.append(r)
    assert wait_until(lambda: get(sb, 9090) == f"hello from local, you are {CLIENT}", LIVENESS, 0.2), r.log()
    assert get(sb) == f"hello from pod, you are {CLIENT}"  # nothing listens on local 80: pod's 80 is not stolen


def test_udp(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    assert udp(sb, "ping") == "ping"
    r = Run(sb, [sys.executable, "-c", _UDP_LOCAL])
    runs.append(r)
    assert wait_until(lambda: udp(sb, "ping") == "local:ping", LIVENESS, 0.2), r.log()
    r.close()
    assert wait_until(lambda: udp(sb, "pong") == "pong", LIVENESS, 0.1)


def test_excluded_sources_keep_the_pod(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    r = Run(sb, [*HTTP_SERVER, str(HTTP), "local"], "--steal-exclude", f"{CLIENT}/32")
    runs.append(r)
    assert wait_until(lambda: get(sb, role="svc").startswith("hello from local"), LIVENESS, 0.2), r.log()
    assert get(sb, role="svc") == f"hello from local, you are {OTHER}"
    assert [get(sb) for _ in range(5)] == [f"hello from pod, you are {CLIENT}"] * 5


def test_a_second_whole_port_steal_is_refused_naming_the_first(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    steal_http(sb, runs)
    marker = Path(sb.dir) / "second-started"
    argv = sb.run_args("touch", str(marker))
    argv[argv.index("--"):argv.index("--")] = ["--steal", "--port", str(HTTP)]
    p = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=LIVENESS)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrord-ns: cannot steal tcp/80: tcp port 80 is already "
                                                   "stolen by session "), p.stderr
    assert "(from 198.19.0.1:" in lines[0]
    assert not marker.exists()  # refused before the command started
    assert get(sb) == f"hello from local, you are {CLIENT}"  # the first session keeps it
    # A port learned from the program is refused with a warning; the command runs on.
    second = Run(sb, [sys.executable, "-c", _LISTENER], name="second")
    runs.append(second)
    assert second.proc.stdout is not None and second.proc.stdout.readline().startswith(b"ready ")
    assert wait_until(lambda: "not stealing tcp/80: tcp port 80 is already stolen by session" in second.log(),
                      LIVENESS, 0.2), second.log()
    assert second.proc.poll() is None
    assert get(sb) == f"hello from local, you are {CLIENT}"


@pytest.mark.parametrize("first,second", [((), ()), (("--http-header-filter", "^x-dev: a$"),
                                                    ("--http-header-filter", "^x-dev: b$"))])
def test_a_steal_through_another_agent_is_refused_naming_the_first(sb: Sandbox, agent: Agent, runs: list[Run],
                                                                   first: tuple[str, ...],
                                                                   second: tuple[str, ...]) -> None:
    """On Kubernetes every `run` launches its own agent: found on the real cluster, a second
    developer's steal of the port (whole, or with another filter) silently took it from the first."""
    host = sb.agent_address.rpartition(":")[0]
    other = sb.start_agent(listen=f"{host}:2223")
    headers = ["-H", "x-dev: a"] if first else []

    def ask() -> str:
        return sb.exec("client", "curl", "-sS", "--max-time", "3", *headers, f"http://{POD}:{HTTP}/").stdout.strip()
    try:
        r = Run(sb, [*HTTP_SERVER, str(HTTP), "local"], *first, "--port", str(HTTP))
        runs.append(r)
        assert wait_until(lambda: ask().startswith("hello from local"), LIVENESS, 0.2), r.log()
        marker = Path(sb.dir) / "second-started"
        argv = sb.run_args("touch", str(marker))
        argv[argv.index("--agent") + 1] = f"{host}:2223"
        argv[argv.index("--"):argv.index("--")] = ["--steal", "--port", str(HTTP), *second]
        p = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=LIVENESS)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mirrord-ns: cannot steal tcp/80: tcp port 80 is already "
                                                       "stolen by session "), p.stderr
        assert "of another agent" in lines[0], p.stderr
        assert not marker.exists()
        assert ask() == f"hello from local, you are {CLIENT}"  # the first session keeps it
    finally:
        sb.stop(other)


def test_bad_exclude_is_one_line_and_changes_nothing(sb: Sandbox, agent: Agent) -> None:
    argv = sb.run_args("true")
    argv[argv.index("--"):argv.index("--")] = ["--steal", "--steal-exclude", "10.0.0.300/8"]
    p = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=LIVENESS)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "--steal-exclude" in p.stderr, p.stderr
    assert leftovers(sb) == []


def test_a_hostile_pod_end_reaches_only_the_stolen_port(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    r = Run(sb, [sys.executable, "-c", _LISTENER])
    runs.append(r)
    assert r.proc.stdout is not None
    _, addr, pid = r.proc.stdout.readline().decode().split()
    assert wait_until(lambda: "stealing tcp/80" in r.log(), LIVENESS, 0.2), r.log()
    only_the_stolen_port_enters(sb, addr, pid, TUNNEL_NET, POD)


def only_the_stolen_port_enters(sb: Sandbox, addr: str, pid: str, tunnel_net: str, pod: str) -> None:
    """A container with NET_ADMIN deletes the agent's tables and a neighbour routes the tunnel
    network via the pod's address `pod`: run's own guard (`pid`'s namespace, tunnel address
    `addr`) lets in the stolen port and nothing else."""
    route = ["ip", "-n", sb.ns("client"), *(["-6"] if ":" in pod else []), "route"]
    subprocess.run([*route, "add", tunnel_net, "via", pod], check=True)
    try:
        for line in sb.exec("pod", "nft", "list", "tables").stdout.splitlines():
            family, name = line.split()[1:]
            if name.startswith("mirrord_ns_"):
                assert sb.exec("pod", "nft", "delete", "table", family, name).returncode == 0

        def connect(port: int) -> str:
            return sb.exec("client", sys.executable, "-c", _CONNECT, addr, str(port)).stdout.strip()

        assert connect(HTTP) == "reached"  # what the user asked to steal
        assert connect(9) == "TimeoutError"  # dropped in run's namespace...
        subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "delete", "table", "inet",
                        "mirrord_ns_inbound"], check=True)
        assert connect(9) == "ConnectionRefusedError"  # ...by its guard: without it, the kernel answers
    finally:
        subprocess.run([*route, "del", tunnel_net], capture_output=True)


# --- giving the port back

# One keep-alive connection: a request, then (when told on stdin) another; prints what became of each.
# One keep-alive connection to the pod (argv[1]): a GET, then another once a line comes on stdin.
_KEEPALIVE = f"""
import http.client, sys, time
c = http.client.HTTPConnection(sys.argv[1], {HTTP}, timeout=20)
for _ in range(2):
    start = time.monotonic()
    try:
        c.request("GET", "/")
        print(c.getresponse().read().decode().strip(), flush=True)
    except OSError as e:
        print(type(e).__name__, round(time.monotonic() - start, 2), flush=True)
    sys.stdin.readline()
"""


def reset_when_the_session_dies(sb: Sandbox, steal: Callable[[], Run], pod: str, client_addr: str) -> None:
    """kill -9 of the `run` that `steal` starts: the program cannot close its connections, the
    agent's end resets them (a connection from the client namespace to `pod`, seen from `client_addr`).

    Another session stays open meanwhile: with the pod's last NAT chain gone, the kernel drops
    the NAT bindings by itself, and the test would pass without the agent's reset.
    """
    bystander = start_run(sb, "sh", "-c", "echo up; sleep 120")
    assert read_line(bystander) == "up\n"
    r = steal()
    client = sb.start("client", [sys.executable, "-c", _KEEPALIVE, pod], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().decode().strip() == f"hello from local, you are {client_addr}"
    r.kill()
    # The session's TUN goes last, after its table and the reset: only the bystander's are left.
    assert wait_until(lambda: len([x for x in leftovers(sb) if x.startswith("link ")]) == 1, LIVENESS)
    client.stdin.write(b"next\n")
    client.stdin.flush()
    outcome = client.stdout.readline().decode().split()
    print(f"\nthe in-flight connection's next request: {' '.join(outcome)} s")
    assert outcome[0] == "ConnectionResetError", outcome  # the pod's kernel answered RST, at once
    sb.stop(client)
    sb.stop(bystander)


def test_an_in_flight_stolen_connection_is_reset_when_the_session_dies(sb: Sandbox, agent: Agent,
                                                                       runs: list[Run]) -> None:
    reset_when_the_session_dies(sb, lambda: steal_http(sb, runs), POD, CLIENT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_the_port_comes_back_when_run_ends(sb: Sandbox, agent: Agent, runs: list[Run], sig: signal.Signals) -> None:
    r = steal_http(sb, runs)
    start = time.monotonic()
    r.kill() if sig == signal.SIGKILL else r.proc.send_signal(sig)
    given_back_after(sb, start, f"{sig.name} of run")
    r.proc.wait(LIVENESS)
    assert wait_until(lambda: not leftovers(sb), LIVENESS), leftovers(sb)


def test_a_dropped_connection_lends_the_port_back_to_the_pod_until_the_session_resumes(
        sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    """The agent keeps a detached session for its grace period, but not its steal: the pod
    answers meanwhile, and the program again once `run` has resumed the session."""
    sb.stop(agent.guard)
    agent.guard = sb.start_agent(resume_timeout=RESUME_GRACE)
    relay = start_relay(sb)
    r = steal_http(sb, runs, agent=f"{LAPTOP_ADDR}:{RELAY_PORT}")
    start = time.monotonic()
    kill(sb, relay)
    given_back_after(sb, start, "the connection to the agent dropped")
    assert r.proc.poll() is None, r.log()
    start_relay(sb)
    assert wait_until(lambda: get(sb).startswith("hello from local"), LIVENESS, 0.2), r.log()
    print(f"stolen again {time.monotonic() - start:.2f} s after the drop")
    assert "reconnecting" in r.log() and "resumed" in r.log(), r.log()


def test_the_port_comes_back_when_the_agent_worker_is_killed(sb: Sandbox, agent: Agent, runs: list[Run]) -> None:
    steal_http(sb, runs)
    worker = agent.worker()
    start = time.monotonic()
    kill_pids([worker])
    given_back_after(sb, start, "kill -9 of the agent worker (its guard cleans up)")
    agent.guard.wait(LIVENESS)
    assert leftovers(sb) == []


def test_the_port_comes_back_when_every_agent_process_is_killed(sb: Sandbox, agent: Agent,
                                                                runs: list[Run]) -> None:
    """The dead-man switch: nobody is left to remove the rules, and still the pod gets its port back."""
    steal_http(sb, runs)
    kill_every_agent_process(sb, agent)
    assert any("mirrord_ns_" in item for item in leftovers(sb))  # the table is still there, but inert


def test_attach_steals_for_a_running_namespace_and_gives_everything_back(sb: Sandbox, agent: Agent) -> None:
    with contextlib.contextmanager(make_app)(sb) as app:
        before = snapshot(app)
        server = sb.start("laptop", ["ip", "netns", "exec", app, *HTTP_SERVER, str(HTTP), "local"],
                          stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        argv = ["ip", "netns", "exec", sb.ns("laptop"), *PY, "-m", "mirrord_tun", "attach", "--steal",
                "--netns", f"/run/netns/{app}", "--agent", sb.agent_address, "--identity", sb.keys.identity,
                "--agent-host-key", sb.keys.host_pub]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env())
        sb.procs.append(p)
        try:
            assert wait_until(lambda: get(sb) == f"hello from local, you are {CLIENT}", LIVENESS, 0.2)
        finally:
            start = time.monotonic()
            p.send_signal(signal.SIGINT)
            assert p.wait(ATTACH_TIMEOUT) == 0
        given_back_after(sb, start, "SIGINT of attach")
        sb.stop(server)
        assert wait_until(lambda: snapshot(app) == before, 10), "attach left the namespace changed"
