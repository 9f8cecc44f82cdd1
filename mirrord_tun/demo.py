"""`mirrord-ns demo`: see the tunnel work with no cluster at all.

Builds the sandbox cluster (mirrord_tun.sandbox) on this machine, runs a command
through `mirrord-ns run` from a "laptop" namespace that cannot reach the cluster
by itself, and tears everything down, also on Ctrl-C, SIGTERM and SIGHUP (the
terminal closed): the sandbox holds namespaces and private keys. Without a
command, the tour goes on with the inbound mirror (a laptop program gets a copy
of a request the pod answers) and steal (a laptop program answers the pod's
requests that carry a header, the pod's own server the rest, and all of them
once the program stops).
"""
from __future__ import annotations

import contextlib
import json
import select
import signal
import subprocess
import sys
import time

from mirrord_tun.interrupts import Interrupts, terminal_foreground
from mirrord_tun.sandbox import ADDRS, PY, Sandbox

TOUR = r"""
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "curl http://svc/   (the service sees the pod's address, not ours)"
curl -sS -m 5 http://svc/ || exit 1
say "getent hosts svc   (the pod's resolver and search domains)"
getent hosts svc || exit 1
say "ping svc"
# iputils' ping works as a user (ICMP echo sockets); Debian 12's busybox ping needs root.
PING=$(command -v ping || echo busybox ping)
$PING -c 3 -W 2 svc || exit 1
"""


# SIGINT too: before `run` starts it, demo's own (Python's default handler can lose it as well).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STEAL_HEADER = "x-mirrord-user: me"
STEAL_START_TIMEOUT = 30.0


def demo(command: list[str], verbose: int = 0) -> int:
    run: list[subprocess.Popen[bytes]] = []  # `mirrord-ns run`, once started

    def to_run(sig: int) -> bool:
        if not run:
            return False  # KeyboardInterrupt: unwinds through Sandbox's cleanup
        if sig != signal.SIGINT or not terminal_foreground():  # else the terminal sent it to `run` too
            # `run` stops its command and cleans up; we remove the sandbox once it has.
            with contextlib.suppress(ProcessLookupError):
                run[0].send_signal(sig)
        return True

    with Interrupts(STOP_SIGNALS, divert=to_run) as stop:
        return _tour(command, run, verbose, stop)


def _tour(command: list[str], run: list[subprocess.Popen[bytes]], verbose: int, stop: Interrupts) -> int:
    _say(f"building a sandbox cluster from namespaces: pod {ADDRS['pod']}, svc {ADDRS['svc']}, "
         f"dns {ADDRS['dns']}")
    with Sandbox() as sb:
        for step in (sb.start_services, sb.start_agent):
            stop.check()
            step()
        direct = sb.exec("laptop", "curl", "-sS", "-m", "2", f"http://{ADDRS['svc']}/")
        _say(f"from the laptop namespace without mirrord-ns: {(direct.stderr or direct.stdout).strip()}")
        argv = command or ["sh", "-c", TOUR]
        stop.check()
        _say(f"now through the tunnel: {' '.join(argv) if command else 'a short tour'}")
        run.append(subprocess.Popen(sb.run_args(*argv, verbose=verbose)))
        sb.procs.append(run[0])  # whatever happens next, close() stops it first
        code = run[0].wait()
        run.clear()  # a stop signal now unwinds through the sandbox's cleanup
        code = 128 - code if code < 0 else code  # `run` killed by signal N, as a shell says it
        _say(f"exit status {code}", before="\n")
        if code == 0 and not command:
            sb.start_ready("pod", [*PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", "80", "pod"])
            code = _mirror(sb, stop) or _steal(sb, stop)
        stop.hold()
        _say("removing the sandbox")
    return code


def _mirror(sb: Sandbox, stop: Interrupts) -> int:
    """The pod answers a client; a laptop program gets a copy, from the client's own address."""
    argv = sb.run_args(*PY, "-m", "mirrord_tun.sandbox.recorder", "tcp", "8080", "-")
    argv[argv.index("--"):argv.index("--")] = ["--port", "8080:80"]
    _say("mirror: `mirrord-ns run --port 8080:80` starts a laptop program on port 8080 that says what reaches it")
    mirror = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, text=True)
    sb.procs.append(mirror)
    try:
        deadline = time.monotonic() + STEAL_START_TIMEOUT
        # Copies start once the program's port is seen listening: ask until one arrives.
        while time.monotonic() < deadline and mirror.poll() is None:
            stop.check()
            answer = _curl(sb, data="hello pod")
            copy = _line(mirror, 1.0)
            if copy:
                # The pod's server answers with the body's sha256: compare it, do not print it.
                same = answer.partition(" ")[0] == copy["sha"]
                _say("a client POSTs 'hello pod' to the pod, which answers it")
                _say(f"the laptop program got a copy: {copy['len']} bytes from {copy['peer']}, "
                     f"{'the same bytes the pod got' if same else 'NOT the bytes the pod got'}")
                return 0 if same else 1
        _say("the mirror did not start")
        return 1
    finally:
        sb.stop(mirror)


def _line(p: subprocess.Popen[str], timeout: float) -> dict[str, object] | None:
    """The next record the recorder printed within `timeout`, skipping its "ready" line."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        line = p.stdout.readline()
        if not line:
            return None
        if line.startswith("{"):
            return json.loads(line)
    return None


def _steal(sb: Sandbox, stop: Interrupts) -> int:
    """The pod's server and a laptop program on the same port, requests routed by a header."""
    server = [*PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0"]
    # The program runs as the user, who may not bind port 80: it serves 8080, which takes the pod's 80.
    argv = sb.run_args(*server, "8080", "laptop")
    argv[argv.index("--"):argv.index("--")] = ["--steal", "--port", "8080:80", "--http-header-filter", STEAL_HEADER]
    _say(f"steal: the pod serves port 80; `mirrord-ns run --steal --port 8080:80 --http-header-filter "
         f"'{STEAL_HEADER}'` starts a laptop program on port 8080")
    # Its own session, as the sandbox's servers: Ctrl-C unwinds through the sandbox's cleanup, which stops it.
    steal = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL)
    sb.procs.append(steal)
    deadline = time.monotonic() + STEAL_START_TIMEOUT
    while not _curl(sb, STEAL_HEADER).startswith("hello from laptop"):
        stop.check()
        if steal.poll() is not None or time.monotonic() > deadline:
            _say("the steal did not start")
            return 1
        time.sleep(0.2)
    _say(f"a client of the pod, with the header:    {_curl(sb, STEAL_HEADER)}")
    _say(f"the same client, without it:             {_curl(sb)}")
    sb.stop(steal)
    _say(f"the program stopped; with the header:    {_curl(sb, STEAL_HEADER)}")
    return 0


def _curl(sb: Sandbox, *headers: str, data: str | None = None) -> str:
    r = sb.exec("client", "curl", "-sS", "-m", "3", *(a for h in headers for a in ("-H", h)),
                *(["--data-binary", data] if data is not None else []), f"http://{ADDRS['pod']}/")
    return (r.stdout or r.stderr).strip()


def _say(text: str, before: str = "") -> None:
    # After a hangup the terminal is gone (EIO): the sandbox must still be removed.
    with contextlib.suppress(OSError):
        print(f"{before}mirrord-ns demo: {text}", file=sys.stderr, flush=True)
