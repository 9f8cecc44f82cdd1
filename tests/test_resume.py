"""A dropped SSH connection: `run` reconnects and resumes, the agent keeps the session meanwhile.

`run` reaches the agent through a TCP relay in the laptop namespace that the test kills
(SIGKILL: both ends see the connection die, as when a port-forward or Wi-Fi goes) and
starts again. The command keeps one TCP connection to an echo server in the svc
namespace the whole time. Resume is also driven by hand, as an attacker would: a wrong
secret, an unknown session, or the right secret under another client key.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import asyncssh
import pytest

from conftest import (POD, SVC, Cluster, assert_clean, leftovers, make_cluster, pid_alive, read_line, run_argv,
                      run_env, wait_until)
from mirrord_tun import protocol
from mirrord_tun.connect import open_channel
from mirrord_tun.protocol import AgentMsg
from mirrord_tun.sandbox import LAPTOP_ADDR, NODE_UPLINK, PY, Sandbox
from kube_env import in_netns
from mirrord_tun.kube import portforward as pf_module
from mirrord_tun.kube.portforward import Forward
from mirrord_tun.kube.session import _forward_again
from mirrord_tun.run import LocalSession
from test_attach import ATTACH_TIMEOUT, detach, in_app, make_app, snapshot
from test_bad_input import Probe, in_laptop
from test_kube_portforward import FakePortForward

ECHO_PORT = 7007
RELAY_PORT = 2300
OUTAGE = 6
GRACE = 15  # longer than OUTAGE, with room for a loaded machine
SHORT_GRACE = 3

_ECHO_SERVER = f"""
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {ECHO_PORT}))
s.listen()
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# The command: ONE connection, a line every 0.2 s, each echo printed; any error ends it (exit 3).
# It stops cleanly once the file named by argv[2] exists.
_ECHO_CLIENT = """
import os, socket, sys, time
c = socket.create_connection((sys.argv[1], %d), timeout=60)
f = c.makefile("rwb")
print("pid", os.getpid(), flush=True)
i = 0
try:
    while not os.path.exists(sys.argv[2]):
        f.write(b"%%d\\n" %% i); f.flush()
        if f.readline() != b"%%d\\n" %% i:
            sys.exit(3)
        print("echo", i, flush=True)
        i += 1
        time.sleep(0.2)
except OSError as e:
    print("error", e, flush=True)
    sys.exit(3)
""" % ECHO_PORT

# A plain TCP relay: every accepted connection is piped to the agent, both ways.
_RELAY = """
import socket, sys, threading
listen, port, target, tport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((listen, port))
s.listen()
print("ready", flush=True)
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    for x in (a, b):
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    a = s.accept()[0]
    b = socket.create_connection((target, tport))
    for x, y in ((a, b), (b, a)):
        threading.Thread(target=pipe, args=(x, y), daemon=True).start()
"""


def _welcome_v4(**change: object) -> dict[str, object]:
    w = protocol.Welcome(protocol.RESUME_VERSION, "abcd", "100.64.0.2", "100.64.0.1", 1500, ["198.18.0.10"],
                         "", "ab" * 32, 60.0).to_json()
    w.update(change)
    return w


@pytest.mark.parametrize("change", [
    {"secret": ""}, {"secret": "AB" * 32}, {"secret": "ab" * 33}, {"secret": 7}, {"resume_timeout": True},
    {"resume_timeout": -1}, {"resume_timeout": float("nan")}, {"resume_timeout": float("inf")},
    {"resume_timeout": "60"},
])
def test_a_hostile_welcome_v4_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(protocol.Malformed):
        protocol.Welcome.from_json(_welcome_v4(**change))


def test_the_secret_stays_out_of_logs() -> None:
    welcome = protocol.Welcome.from_json(_welcome_v4())
    assert (welcome.secret, welcome.resume_timeout) == ("ab" * 32, 60.0)
    assert "ab" * 32 not in repr(welcome)


@pytest.mark.parametrize("body", [
    {}, {"session": "abcd"}, {"session": "abcd", "secret": "ab"}, {"session": "ABCD", "secret": "ab" * 32},
    {"session": ["abcd"], "secret": "ab" * 32}, {"session": "abcd", "secret": None},
])
def test_a_malformed_resume_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(protocol.Malformed):
        protocol.parse_resume(protocol.control(protocol.ClientMsg.RESUME, body)[5:])


def _cluster_with_grace(grace: float) -> Iterator[Cluster]:
    made = make_cluster()
    cluster = next(made)
    try:
        cluster.sb.stop(cluster.agent)
        cluster.agent = cluster.sb.start_agent(resume_timeout=grace)
        cluster.sb.start_ready("svc", [sys.executable, "-c", _ECHO_SERVER])
        yield cluster
    finally:
        made.close()  # the sandbox goes, with everything registered in it


@pytest.fixture
def resumable() -> Iterator[Cluster]:
    yield from _cluster_with_grace(GRACE)


@pytest.fixture
def short_grace() -> Iterator[Cluster]:
    yield from _cluster_with_grace(SHORT_GRACE)


def start_relay(sb: Sandbox, agent: str | None = None) -> subprocess.Popen[bytes]:
    host, port = (agent or sb.agent_address).rsplit(":", 1)
    return sb.start_ready("laptop", [*PY, "-c", _RELAY, LAPTOP_ADDR, str(RELAY_PORT), host, port])


def kill(sb: Sandbox, p: subprocess.Popen[bytes]) -> None:
    sb.stop(p, signal.SIGKILL)
    sb.procs.remove(p)


def start_echo_run(sb: Sandbox, stop_file: str) -> subprocess.Popen[bytes]:
    argv = run_argv(sb, *PY, "-c", _ECHO_CLIENT, SVC, stop_file, agent=f"{LAPTOP_ADDR}:{RELAY_PORT}")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env())
    sb.procs.append(p)
    return p


def echoes(p: subprocess.Popen[bytes], count: int) -> int:
    """Wait for `count` more echo lines; the last echo number."""
    last = -1
    for _ in range(count):
        line = read_line(p).split()
        assert line and line[0] == "echo", f"the command said {' '.join(line)!r}"
        last = int(line[1])
    return last


def test_command_and_its_connection_survive_an_outage(resumable: Cluster) -> None:
    sb = resumable.sb
    stop_file = os.path.join(sb.dir, "stop")
    relay = start_relay(sb)
    p = start_echo_run(sb, stop_file)
    assert read_line(p).startswith("pid ")
    before = echoes(p, 3)

    kill(sb, relay)
    time.sleep(OUTAGE)
    assert p.poll() is None, "run ended during the outage"
    assert leftovers(sb), "the agent dropped the session during its grace period"
    start_relay(sb)

    after = echoes(p, 5)  # the same connection: the client never reconnects, any error ends it
    assert after > before
    with open(stop_file, "w"):
        pass
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    err_text = err.decode()
    assert err_text.count("reconnecting") == 1 and err_text.count("resumed after") == 1, err_text
    assert "Traceback" not in err_text
    assert_clean(sb)

    # The agent serves new sessions afterwards (through the relay that came back).
    new = subprocess.run(run_argv(sb, "true", agent=f"{LAPTOP_ADDR}:{RELAY_PORT}"), capture_output=True,
                         text=True, env=run_env(), timeout=60)
    assert new.returncode == 0, new.stderr
    assert_clean(sb)


def test_attach_resumes_too(resumable: Cluster) -> None:
    sb = resumable.sb
    made = make_app(sb)
    app = next(made)
    try:
        before = snapshot(app)
        relay = start_relay(sb)
        p = subprocess.Popen(["ip", "netns", "exec", sb.ns("laptop"), *PY, "-m", "mirrord_tun", "attach",
                              "--netns", f"/run/netns/{app}", "--agent", f"{LAPTOP_ADDR}:{RELAY_PORT}",
                              "--identity", sb.keys.identity, "--agent-host-key", sb.keys.host_pub],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env())
        sb.procs.append(p)
        p.stdout = p.stderr  # read_line reads stdout: attach talks on stderr
        assert "in the pod's network" in read_line(p, ATTACH_TIMEOUT)
        kill(sb, relay)
        assert "reconnecting" in read_line(p)
        time.sleep(2)
        start_relay(sb)
        curl = in_app(app, "curl", "-sS", "-m", "30", f"http://{SVC}/")
        assert curl.stdout == f"hello from svc, you are {POD}\n", curl.stderr
        assert p.poll() is None
        assert detach(p) == 0
        assert snapshot(app) == before
    finally:
        made.close()  # the namespace goes, also when the test fails
    assert_clean(sb)


def test_outage_longer_than_the_grace_period_ends_the_session_cleanly(short_grace: Cluster) -> None:
    sb = short_grace.sb
    relay = start_relay(sb)
    p = start_echo_run(sb, os.path.join(sb.dir, "never"))
    command = int(read_line(p).split()[1])
    echoes(p, 2)

    kill(sb, relay)
    _, err = p.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 2, lines
    assert "Traceback" not in err.decode()
    assert len(lines) == 2 and "reconnecting" in lines[0], lines  # the outage, then why it ended
    assert lines[1].startswith("mirrord-ns: cannot resume the session:"), lines
    assert wait_until(lambda: not pid_alive(command), 10), "the command outlived run"
    assert_clean(sb, timeout=SHORT_GRACE + 20)


def _drop(probe: Probe) -> None:
    """Lose the connection without a goodbye, as a dead network does."""
    assert probe.conn is not None
    probe.conn.abort()


async def _resume_refused(probe: Probe, session: str, secret: str) -> str:
    probe.send(protocol.resume(session, secret))
    error = protocol.parse_control(await probe.expect(AgentMsg.ERROR))["error"]
    await asyncio.wait_for(probe.closed, 10)  # the agent closed the channel after the one line
    return str(error)


def test_resume_needs_the_secret_and_the_same_key(short_grace: Cluster) -> None:
    sb = short_grace.sb
    # A second key the agent also lets in: the session must still be bound to the first one.
    other = asyncssh.generate_private_key("ssh-ed25519")
    both = os.path.join(sb.dir, "both.pub")
    with open(both, "w") as f:
        f.write(open(sb.keys.identity_pub).read().strip() + "\n" + other.export_public_key().decode())
    sb.stop(short_grace.agent)
    short_grace.agent = sb.start_ready("node", [
        *PY, "-m", "mirrord_tun", "agent", "--listen", sb.agent_address, "--authorized-key", both,
        "--host-key", sb.keys.host_key, "--netns", sb.netns_path("pod"), "--resume-timeout", "30"],
        ready="listening", stderr=None)

    async def scenario() -> None:
        owner = await Probe().open(sb)
        welcome = await owner.hello()
        assert welcome.version == protocol.VERSION and welcome.resume_timeout == 30
        _drop(owner)
        wrong = "0" * 64 if welcome.secret != "0" * 64 else "1" * 64
        assert "no such session" in await _resume_refused(await Probe().open(sb), welcome.session, wrong)
        assert "no such session" in await _resume_refused(await Probe().open(sb), "ffffffff", welcome.secret)

        thief = Probe()
        thief.conn = await open_channel(sb.agent_address, other, asyncssh.read_public_key(sb.keys.host_pub),
                                        thief.session)
        assert "no such session" in await _resume_refused(thief, welcome.session, welcome.secret)

        # After all that, the owner still gets its session back, and it carries packets.
        back = await Probe().open(sb)
        back.send(protocol.resume(welcome.session, welcome.secret))
        again = protocol.Welcome.from_json(protocol.parse_control(await back.expect(AgentMsg.WELCOME)))
        assert (again.session, again.client_addr) == (welcome.session, welcome.client_addr)
        await back.ping(welcome.client_addr, 7)
        assert (await back.stats())["resumed"] == 1
        await back.close()  # a goodbye: the session ends now, no grace period

    in_laptop(sb, scenario)
    assert_clean(sb, timeout=10)


def test_idle_exit_waits_for_a_detached_session(short_grace: Cluster) -> None:
    """--idle-exit counts a session whose connection dropped until its grace period is over."""
    sb = short_grace.sb
    sb.stop(short_grace.agent)
    agent = short_grace.agent = sb.start_agent("--idle-exit", "1", resume_timeout=4)

    async def scenario() -> None:
        owner = await Probe().open(sb)
        welcome = await owner.hello()
        _drop(owner)
        await asyncio.sleep(2.5)  # past --idle-exit, within the grace period
        assert agent.poll() is None, "the agent left while a detached session could still come back"
        back = await Probe().open(sb)
        back.send(protocol.resume(welcome.session, welcome.secret))
        await back.expect(AgentMsg.WELCOME)
        _drop(back)

    in_laptop(sb, scenario)
    agent.wait(4 + 1 + 20)  # the grace period, --idle-exit, and a liveness margin
    assert leftovers(sb) == []


def test_each_attempt_opens_a_new_port_forward(fresh_cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                                               capfd: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Kubernetes mode: the port-forward dies (its websocket ends), run opens another and resumes."""
    sb = fresh_cluster.sb
    made: list[FakePortForward] = []

    def fake_portforward(api_method: Any, name: str, namespace: str, ports: str) -> FakePortForward:
        upstream = in_netns(sb.netns_path("laptop"), lambda: socket.create_connection((NODE_UPLINK, 2222), 5))
        made.append(FakePortForward(upstream, int(ports)))
        return made[-1]

    monkeypatch.setattr(pf_module, "portforward", fake_portforward)
    cluster = SimpleNamespace(core=SimpleNamespace(connect_get_namespaced_pod_portforward=None))
    first = Forward(cluster, "mirrord-ns-agent-x", "default", 2222)  # type: ignore[arg-type]
    forwards: list[Forward] = []
    stop_file = os.path.join(sb.dir, "stop")
    key = asyncssh.read_private_key(sb.keys.identity)
    pinned = asyncssh.read_public_key(sb.keys.host_pub)
    curl = f"curl -sS -m 30 http://{SVC}/"

    def break_first_forward() -> None:
        wait_until(lambda: leftovers(sb) != [], 30)  # the session is up
        time.sleep(1)
        made[0]._upstream.shutdown(socket.SHUT_RDWR)  # as when the kubelet's stream ends
        wait_until(lambda: len(made) >= 2, 30)
        open(stop_file, "w").close()

    async def go() -> int:
        session = LocalSession(["sh", "-c", f"{curl}; while [ ! -e {stop_file} ]; do sleep 0.1; done; {curl}"],
                               "pod/mirrord-ns-agent-x:2222", key, pinned, sock=first.sock)
        session.new_sock = lambda: _forward_again(forwards, Forward(
            cluster, "mirrord-ns-agent-x", "default", 2222))  # type: ignore[arg-type]
        return await session.run()

    breaker = threading.Thread(target=break_first_forward, daemon=True)
    breaker.start()
    try:
        assert asyncio.run(go()) == 0
    finally:
        breaker.join(30)
        for forward in [first, *forwards]:
            forward.close()
    out, err = capfd.readouterr()
    assert out.count(f"you are {POD}") == 2, (out, err)
    assert "Traceback" not in err, err
    assert "reconnecting" in caplog.text and "resumed after" in caplog.text, caplog.text  # run's lines, in-process
    assert len(made) == 2  # one new port-forward, for the one attempt it took
    assert_clean(sb)


def test_a_deleted_agent_pod_ends_the_reconnect_at_once() -> None:
    """No port-forward is tried toward a pod the API says is gone: `run` stops retrying then."""
    from types import SimpleNamespace

    from kubernetes import client

    from mirrord_tun.connect import Gone
    from mirrord_tun.kube.session import reconnect_forward

    def cluster(read: Any) -> Any:
        return SimpleNamespace(core=SimpleNamespace(read_namespaced_pod=read))

    def missing(name: str, namespace: str) -> Any:
        raise client.ApiException(status=404, reason="Not Found")

    def finished(name: str, namespace: str) -> Any:
        return client.V1Pod(metadata=client.V1ObjectMeta(name=name), status=client.V1PodStatus(phase="Succeeded"))

    def oom_killed(name: str, namespace: str) -> Any:  # a flood did this on the real cluster
        ended = client.V1ContainerStateTerminated(exit_code=137, reason="OOMKilled")
        statuses = [client.V1ContainerStatus(name="agent", image="x", image_id="", ready=False, restart_count=0,
                                             state=client.V1ContainerState(terminated=ended))]
        return client.V1Pod(metadata=client.V1ObjectMeta(name=name),
                            status=client.V1PodStatus(phase="Failed", container_statuses=statuses))

    for read, said in ((missing, "is gone"), (finished, r"is gone \(succeeded\)"),
                       (oom_killed, r"is gone \(failed, OOMKilled \(exit 137\)\)")):
        with pytest.raises(Gone, match=said):
            reconnect_forward(cluster(read), "mirrord-ns-agent-x", "default", [])
