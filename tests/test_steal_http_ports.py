"""Filtered steal end to end: which ports are filtered, and the filters a config file combines.

The pod serves HTTP on 80 (the sandbox server) and a server-first protocol on BANNER_PORT
(a greeting, then an echo, like SMTP). The program under `run --steal` serves the same
two ports: HTTP as "local-NAME" (test_steal_http's program), the greeting as "local".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import wait_until
from test_steal import HTTP, LIVENESS, POD, Agent, Run, agent, runs, sb  # noqa: F401 - fixtures
from test_steal_http import _LOCAL, CLIENT, get

from mirrord_tun.sandbox import PY, Sandbox

BANNER_PORT = 2525

# A server-first protocol: greets every connection with "220 NAME ready" at once, then echoes.
_BANNER = """
import socket, threading

def banner(name, port, ready=lambda: None):
    s = socket.create_server(("0.0.0.0", port))
    ready()

    def serve(c):
        with c:
            c.sendall(f"220 {name} ready\\r\\n".encode())
            c.sendall(c.recv(4096))

    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
_POD_BANNER = _BANNER + 'import sys\nbanner(sys.argv[1], int(sys.argv[2]), lambda: print("ready", flush=True))\n'
# The program (arguments: me 80): the banner in a thread, then test_steal_http's HTTP program.
_PROGRAM = _BANNER + f'threading.Thread(target=banner, args=("local", {BANNER_PORT}), daemon=True).start()\n' + _LOCAL

# A client that waits for the server's first line without sending anything first.
_GREETED = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print(s.recv(4096).decode().strip())
"""


@pytest.fixture
def pod_banner(sb: Sandbox) -> Iterator[None]:  # noqa: F811
    p = sb.start_ready("pod", [*PY, "-c", _POD_BANNER, "pod", str(BANNER_PORT)])
    yield
    sb.stop(p)


def greeting(sb: Sandbox) -> str:  # noqa: F811
    r = sb.exec("client", sys.executable, "-c", _GREETED, POD, str(BANNER_PORT))
    return r.stdout.strip() if r.returncode == 0 else f"failed: {r.stderr.strip()}"


def start(sb: Sandbox, runs: list[Run], *options: str) -> Run:  # noqa: F811
    r = Run(sb, [*PY, "-c", _PROGRAM, "me", str(HTTP)], *options, name="ports")
    runs.append(r)
    assert wait_until(lambda: "stealing " in r.log(), LIVENESS, 0.2), r.log()
    return r


def test_a_served_port_that_is_not_http_stays_the_pods(sb: Sandbox, agent: Agent, runs: list[Run],  # noqa: F811
                                                       pod_banner: None) -> None:
    r = start(sb, runs, "--http-header-filter", "x-mirrord-user: me")
    assert wait_until(lambda: get(sb, "x-mirrord-user: me").startswith("hello from local-me"), LIVENESS, 0.2), r.log()
    assert get(sb) == f"hello from pod, you are {CLIENT}"
    # The program serves BANNER_PORT too, but it is not an HTTP port: the pod keeps it, and
    # its greeting comes from the pod without anything in between waiting for the client.
    assert greeting(sb) == "220 pod ready"
    stolen = [line for line in r.log().splitlines() if "stealing " in line][-1]
    assert "tcp/80" in stolen and f"tcp/{BANNER_PORT}" not in stolen, stolen


def test_a_port_named_with_port_but_not_http_is_stolen_whole(sb: Sandbox, agent: Agent, runs: list[Run],  # noqa: F811
                                                             pod_banner: None) -> None:
    r = start(sb, runs, "--http-header-filter", "x-mirrord-user: me", "--http-filter-ports", str(HTTP),
              "--port", str(BANNER_PORT))
    assert wait_until(lambda: greeting(sb) == "220 local ready", LIVENESS, 0.2), r.log()
    assert wait_until(lambda: get(sb, "x-mirrord-user: me").startswith("hello from local-me"), LIVENESS, 0.2), r.log()
    assert get(sb) == f"hello from pod, you are {CLIENT}"


def test_method_and_any_of_from_a_config_file(sb: Sandbox, agent: Agent, runs: list[Run],  # noqa: F811
                                              tmp_path: Path) -> None:
    conf = tmp_path / "steal.toml"
    conf.write_text('http-method-filter = "GET"\n'
                    'http-filter-any-of = ["path=^/mine", "header=^x-mirrord-user: me$"]\n')
    r = start(sb, runs, "-f", str(conf))
    assert wait_until(lambda: get(sb, "x-mirrord-user: me").startswith("hello from local-me"), LIVENESS, 0.2), r.log()
    url = f"http://{POD}:{HTTP}"

    def curl(*args: str) -> str:
        return sb.exec("client", "curl", "-sS", "--max-time", "10", *args).stdout.strip()

    assert curl(f"{url}/mine?x=1") == f"hello from local-me, you are {CLIENT}"
    assert curl(f"{url}/MINE") == f"hello from pod, you are {CLIENT}"  # case-sensitive by default
    assert curl(f"{url}/other") == f"hello from pod, you are {CLIENT}"
    # POST: the method filter says no, whatever any-of says
    posted = curl("-d", "x", f"{url}/mine")
    assert posted.endswith(f"from {CLIENT}") and not posted.startswith("local-"), posted
    assert curl("--http1.0", f"{url}/mine") == f"hello from local-me, you are {CLIENT}"
