#!/usr/bin/env python3
"""What the filtered-steal proxy (agent/steal/http1.py) adds to requests it leaves with the pod.

    .venv/bin/python scripts/bench_httpsteal.py [--requests N] [--mb MB] [--rounds R] [--json]

On loopback, in one run: two keep-alive HTTP/1.1 servers (uvloop + httptools,
standing for the pod's server and the local program) and the proxy (uvloop,
its own process, header filter `x-dev: me`). The client (this process,
blocking sockets) measures the same workloads straight to the pod's server and
through the proxy with requests that do not match, alternating per round:

- p50/p99 of small GETs, a new TCP connection each, and on one keep-alive connection;
- throughput of MB-sized POST bodies (Content-Length, then chunked) on one connection;
- p50 of matching small requests (to the local server), for reference;
- wrk, `--connections` keep-alive clients (200) for `--seconds`, straight to the pod's
  server, through the proxy and through haproxy (HTTP mode, the filter as an ACL), req/s,
  p50/p99 and the CPU microseconds per request of the proxy and of the pod's server,
  alternating per round (`--wrk-only` for just this; `--server nginx`: nginx as both servers).

`--agent-workers 0,1,2` (root): the same wrk load through the real agent in a sandbox, its
filtered steal served by the agent and that many proxy workers (`agent --steal-proxy-workers`).

`--redis` (root): Redis in a sandbox pod next to a filtered steal of the pod's HTTP port,
redis-benchmark without and with the session (the port is not an HTTP port: not proxied).

Then a parser micro-benchmark, h11 (the proxy's parser before) vs httptools (llhttp,
its parser now), on small request heads and on a large chunked body.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median, percentile  # noqa: E402

from mirrord_tun.sandbox import nginx  # noqa: E402

HOST = "127.0.0.1"
SEND = 1024 * 1024


# --------------------------------------------------------------------------- server / proxy roles
def _serve(name: str, host: str = HOST, *ports: str) -> None:
    """The server; on `ports` (else a free one, printed) of `host`, "ready" once listening."""
    import httptools
    import uvloop

    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name.encode())

    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(reply)

    async def main() -> None:
        servers = [await asyncio.get_running_loop().create_server(Http, host, int(port), reuse_address=True)
                   for port in ports or ("0",)]
        print("ready" if ports else servers[0].sockets[0].getsockname()[1], flush=True)
        await asyncio.gather(*(server.serve_forever() for server in servers))

    uvloop.run(main())


def _proxy(pod_port: int, local_port: int) -> None:
    """The proxy's HTTP/1 code in one process on loopback (no namespace, no redirect: agent_load
    measures the agent itself, with its proxy workers)."""
    import uvloop

    from mirrord_tun.agent.steal.filters import HttpFilter
    from mirrord_tun.agent.steal.http1 import HttpProxy

    filt = HttpFilter.compile("^x-dev: me$", None)
    counters: collections.Counter = collections.Counter()
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)

    def opener(port: int):
        async def open_(factory):
            transport, _ = await asyncio.get_running_loop().create_connection(factory, HOST, port)
            return transport
        return open_

    pod, local = opener(pod_port), opener(local_port)

    def setup(_transport):
        return (lambda head: local if filt.matches(head) else None), pod

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: HttpProxy(setup, counters, lambda _conn: None), sock=sock)
        await server.serve_forever()

    uvloop.run(main())


def _start(*role: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *role], stdout=subprocess.PIPE,
                            start_new_session=True)  # its own group, whose CPU is counted
    return proc, int(proc.stdout.readline())


def _start_nginx(name: str) -> tuple[subprocess.Popen, int]:
    """nginx (one process, as a pod's server would be a process of its own) answering `name`."""
    port, conf_dir = _free_port(), tempfile.mkdtemp(prefix="bench-nginx-")
    argv = nginx.configure(conf_dir, f"{HOST}:{port}", f'return 200 "{name}";', connections=4096,
                           http="keepalive_requests 10000000;")
    proc = subprocess.Popen(argv, start_new_session=True)
    proc.conf_dir = conf_dir  # type: ignore[attr-defined]
    return _ready(proc, port, "nginx")


def _start_busybox(name: str) -> tuple[subprocess.Popen, int]:
    """busybox httpd: a server that closes every connection after one answer (HTTP/1.0-style,
    "Connection: close") and forks per connection, so each request is a new connection through
    the proxy too: the proxy's cost per connection, not per request."""
    port, conf_dir = _free_port(), tempfile.mkdtemp(prefix="bench-busybox-")
    with open(os.path.join(conf_dir, "x"), "w") as f:
        f.write(name)
    proc = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"{HOST}:{port}", "-h", conf_dir], start_new_session=True)
    proc.conf_dir = conf_dir  # type: ignore[attr-defined]
    return _ready(proc, port, "busybox httpd")


def _free_port() -> int:
    with socket.socket() as probe:  # nginx and haproxy have no "port 0, tell me"
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _ready(proc: subprocess.Popen, port: int, name: str) -> tuple[subprocess.Popen, int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return proc, port
        time.sleep(0.05)
    _stop(proc)
    raise RuntimeError(f"{name} did not start")


def _start_haproxy(pod_port: int, local_port: int, threads: int) -> tuple[subprocess.Popen, int]:
    """The C reference: haproxy in HTTP mode with the filter as a header ACL (`x-dev: me` to the
    local server, the rest to the pod's), keep-alive both ways, `threads` threads."""
    port, conf_dir = _free_port(), tempfile.mkdtemp(prefix="bench-haproxy-")
    proc = subprocess.Popen(_haproxy_argv(os.path.join(conf_dir, "haproxy.cfg"), f"{HOST}:{port}", pod_port,
                                          local_port, threads),
                            stdout=subprocess.DEVNULL, start_new_session=True)
    proc.conf_dir = conf_dir  # type: ignore[attr-defined]
    return _ready(proc, port, "haproxy")


def _haproxy_argv(conf: str, bind: str, pod_port: int, local_port: int, threads: int) -> list[str]:
    """haproxy's command line, its configuration written to `conf`."""
    with open(conf, "w") as f:
        f.write(f"global\n  nbthread {threads}\n  maxconn 4096\n"
                "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
                "  timeout client 30s\n  timeout server 30s\n"
                f"frontend steal\n  bind {bind}\n  acl dev req.hdr(x-dev) -m reg -i ^me$\n"
                "  use_backend local if dev\n  default_backend pod\n"
                f"backend pod\n  server pod {HOST}:{pod_port}\n"
                f"backend local\n  server local {HOST}:{local_port}\n")
    return ["haproxy", "-db", "-f", conf]


def _servers(kind: str) -> tuple[list[subprocess.Popen], int, int]:
    """The pod's server and the local program's: (processes, pod port, local port)."""
    start = {"nginx": _start_nginx, "busybox": _start_busybox}.get(kind) or (lambda name: _start("serve", name))
    pod, pod_port = start("pod")
    local, local_port = start("local")
    return [pod, local], pod_port, local_port


def _group_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) of every process in `proc`'s group (nginx's worker, the
    agent's proxy workers)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == proc.pid:  # fields[2]: the process group
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if hasattr(p, "conf_dir"):
            shutil.rmtree(p.conf_dir, ignore_errors=True)


# --------------------------------------------------------------------------- client
def _response(sock: socket.socket, expect_end: bytes) -> None:
    got = b""
    while not got.endswith(expect_end):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"closed after {got!r}")
        got += data


def _latency(port: int, n: int, keepalive: bool, mine: bool = False) -> list[float]:
    req = b"GET /x HTTP/1.1\r\nHost: bench\r\n" + (b"X-Dev: me\r\n" if mine else b"X-Dev: other\r\n") + b"\r\n"
    end = b"\r\n\r\nlocal" if mine else b"\r\n\r\npod"
    out = []
    sock = socket.create_connection((HOST, port)) if keepalive else None
    for _ in range(n):
        t0 = time.perf_counter()
        s = sock or socket.create_connection((HOST, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(req)
        _response(s, end)
        if not keepalive:
            s.close()
        out.append((time.perf_counter() - t0) * 1000)
    if sock:
        sock.close()
    return out


def _post(port: int, body: memoryview, chunked: bool) -> float:
    """Gbit/s of one POST of `body` on a fresh connection, until its response."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    with socket.create_connection((HOST, port)) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: bench\r\n%s\r\n\r\n" % framing)
        for i in range(0, len(body), SEND):
            piece = body[i:i + SEND]
            if chunked:
                s.sendall(b"%x\r\n" % len(piece))
            s.sendall(piece)
            if chunked:
                s.sendall(b"\r\n")
        if chunked:
            s.sendall(b"0\r\n\r\n")
        _response(s, b"\r\n\r\npod")
        return len(body) * 8 / (time.perf_counter() - t0) / 1e9


def _wrk(port: int, connections: int, seconds: int, mine: bool = False, host: str = HOST,
         prefix: tuple[str, ...] = ()) -> dict[str, float]:
    """wrk's req/s and latency percentiles (ms), `connections` keep-alive clients on 2 threads
    (`prefix`: to run it elsewhere, e.g. `ip netns exec NS`)."""
    header = "X-Dev: me" if mine else "X-Dev: other"
    out = subprocess.run([*prefix, "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", header,
                          f"http://{host}:{port}/x"], capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0 or "Requests/sec:" not in out.stdout:
        raise RuntimeError(f"wrk failed: {out.stderr.strip() or out.stdout.strip()}")
    result = {"rps": float(out.stdout.split("Requests/sec:")[1].split()[0])}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            value, unit = float(parts[1].rstrip("usm")), parts[1].lstrip("0123456789.")
            result[f"p{parts[0][:-1]}_ms"] = round(value * {"us": 1e-3, "ms": 1, "s": 1e3}[unit], 3)
    bad = [line for line in out.stdout.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if bad:
        result["errors"] = " ".join(bad)  # type: ignore[assignment]
    return result


def _wrk_cpu(port: int, connections: int, seconds: int, procs: dict[str, subprocess.Popen],
             mine: bool = False, **where: object) -> dict[str, float]:
    """_wrk, with the CPU microseconds per request each of `procs` (their groups) spent meanwhile:
    the figure a shared machine distorts least."""
    before = {name: _group_cpu(p) for name, p in procs.items()}
    result = _wrk(port, connections, seconds, mine, **where)  # type: ignore[arg-type]
    requests = result["rps"] * seconds
    for name, p in procs.items():
        result[f"{name}_cpu_us"] = round((_group_cpu(p) - before[name]) / requests * 1e6, 2)
    return result


def load(connections: int, seconds: int, rounds: int, server: str = "python") -> dict:
    """wrk against the pod's server directly and through the proxy (requests that go to the
    pod, and matching ones), alternating, in one run; medians over the rounds, with each
    round's req/s so the spread shows. Where haproxy is installed, also through haproxy (HTTP
    mode, the filter as a header ACL, 1 and 2 threads): what a C proxy reaches in the same run."""
    servers, pod_port, local_port = _servers(server)
    proxy, proxy_port = _start("proxy", str(pod_port), str(local_port))
    others: dict[str, tuple[subprocess.Popen, int]] = {}
    runs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    try:
        if shutil.which("haproxy"):
            for threads in (1, 2):
                others[f"haproxy_{threads}t"] = _start_haproxy(pod_port, local_port, threads)
        for _ in range(rounds):
            runs["direct"].append(_wrk_cpu(pod_port, connections, seconds, {"pod": servers[0]}))
            runs["proxy"].append(_wrk_cpu(proxy_port, connections, seconds, {"proxy": proxy, "pod": servers[0]}))
            runs["proxy_matched"].append(_wrk(proxy_port, connections, seconds, mine=True))
            for name, (proc, port) in others.items():  # "proxy_cpu_us" there: haproxy's
                runs[name].append(_wrk_cpu(port, connections, seconds, {"proxy": proc, "pod": servers[0]}))
    finally:
        _stop(proxy, *servers, *(proc for proc, _ in others.values()))
    out: dict = {"connections": connections, "seconds": seconds, "rounds": rounds, "server": server,
                 **_medians(runs)}
    for via in ("proxy", *others):
        suffix = "" if via == "proxy" else f"_{via}"
        out[f"ratio_rps{suffix}"] = round(out[via]["rps"] / out["direct"]["rps"], 3)
        out[f"ratio_rps_rounds{suffix}"] = [round(p["rps"] / d["rps"], 3) for d, p in zip(runs["direct"], runs[via])]
        out[f"ratio_p99{suffix}"] = round(out[via]["p99_ms"] / out["direct"]["p99_ms"], 3)
    if not others:
        out["haproxy"] = "skipped: no haproxy"
    return out


def _medians(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict]:
    """Each way's median figures over the rounds, with each round's req/s so the spread shows."""
    out: dict[str, dict] = {}
    for via, results in runs.items():
        keys = [k for k in results[0] if k != "errors"]
        out[via] = {k: round(median([r[k] for r in results]), 3) for k in keys}
        out[via]["rps_rounds"] = [r["rps"] for r in results]
        errors = [r["errors"] for r in results if "errors" in r]
        if errors:
            out[via]["errors"] = errors
    return out


def report_haproxy(w: dict) -> None:
    """The C reference's lines of the wrk comparison."""
    if "haproxy" in w:
        print(f"haproxy reference: {w['haproxy']}")
    for threads in (1, 2):
        via = f"haproxy_{threads}t"
        if via in w:
            print(f"haproxy (http mode, header ACL, {threads} thread(s)): {w[via]['rps']:.0f} req/s p99 "
                  f"{w[via]['p99_ms']} ms (x{w[f'ratio_rps_{via}']} req/s, rounds {w[f'ratio_rps_rounds_{via}']}), "
                  f"{w[via]['proxy_cpu_us']} us CPU per request")


REDIS_PORT, HTTP_PORT = 6379, 8080
# The session's program: HTTP on 8080 (a filtered port by default) and a listener on Redis's
# port, so `run` learns both as served; only 8080 is an HTTP port, so 6379 stays the pod's.
_PROGRAM = f"""
import socket, sys
from mirrord_tun.sandbox import http_server
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {REDIS_PORT}))
s.listen()
sys.argv = ["http_server", "0.0.0.0", "{HTTP_PORT}", "local"]
http_server.main()
"""


def _redis_benchmark(sb, host: str, requests: int) -> dict[str, float]:
    """redis-benchmark's GET and SET req/s from the client namespace (50 clients, no pipelining)."""
    r = sb.exec("client", "redis-benchmark", "-h", host, "-p", str(REDIS_PORT), "-n", str(requests), "-t", "get,set",
                "--csv", timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {r.stderr.strip()[-300:]}")
    out = {}
    for line in r.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("GET", "SET"):
            out[cells[0].lower()] = float(cells[1])
    return out


def redis(rounds: int, requests: int) -> dict:
    """Redis in the pod, next to a filtered steal of the pod's HTTP port (a sandbox with the agent,
    `run --steal --http-header-filter` whose program also listens on Redis's port): redis-benchmark
    from the client straight to the pod, without and with the session, alternating."""
    from mirrord_tun.sandbox import ADDRS, PY, Sandbox

    pod = ADDRS["pod"]
    runs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    with Sandbox() as sb:
        sb.start_agent()
        sb.start("pod", ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--save", "",
                         "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL)
        sb.start_ready("pod", [*PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", str(HTTP_PORT), "pod"])
        deadline = time.monotonic() + 15
        while sb.exec("client", "redis-cli", "-h", pod, "ping").stdout.strip() != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.2)
        for _ in range(rounds):
            runs["direct"].append(_redis_benchmark(sb, pod, requests))
            run = _filtered_session(sb, HTTP_PORT, "-c", _PROGRAM)
            try:
                runs["session"].append(_redis_benchmark(sb, pod, requests))
            finally:
                sb.stop(run)
    out: dict = {"rounds": rounds, "requests": requests}
    for via, results in runs.items():
        out[via] = {k: round(median([r[k] for r in results]), 0) for k in ("get", "set")}
    for kind in ("get", "set"):
        out[f"ratio_{kind}"] = round(out["session"][kind] / out["direct"][kind], 3)
        out[f"ratio_{kind}_rounds"] = [round(s[kind] / d[kind], 3) for d, s in zip(runs["direct"], runs["session"])]
    return out


STOLEN, DIRECT = 80, 8080  # the pod server's ports: 80 behind the filtered steal, 8080 never
HAPROXY_PORTS = {1: 8081, 2: 8082}


def agent_load(workers: list[int], connections: int, seconds: int, rounds: int) -> dict:
    """The real agent, in a sandbox (root): wrk from the client namespace to the pod's server
    straight (port 8080), through haproxy in the pod (1 and 2 threads, if installed), and through
    a filtered steal of port 80 (`run --steal --http-header-filter`) by an agent with each of
    `workers` proxy workers, alternating per round; CPU per request of the agent (with its
    workers), haproxy and the pod's server."""
    from mirrord_tun.sandbox import ADDRS, Sandbox

    pod, runs = ADDRS["pod"], collections.defaultdict(list)
    with Sandbox() as sb:
        client = ("ip", "netns", "exec", sb.ns("client"))
        server = sb.start_ready("pod", [sys.executable, os.path.abspath(__file__), "serve", "pod", "0.0.0.0",
                                        str(STOLEN), str(DIRECT)])
        haproxies = {}
        if shutil.which("haproxy"):
            for threads, port in HAPROXY_PORTS.items():
                argv = _haproxy_argv(os.path.join(sb.dir, f"haproxy{threads}.cfg"), f"0.0.0.0:{port}", DIRECT,
                                     DIRECT, threads)
                haproxies[threads] = sb.start("pod", argv, stdout=subprocess.DEVNULL)
        for _ in range(rounds):
            runs["direct"].append(_wrk_cpu(DIRECT, connections, seconds, {"pod": server}, host=pod, prefix=client))
            for threads, proc in haproxies.items():
                runs[f"haproxy_{threads}t"].append(_wrk_cpu(HAPROXY_PORTS[threads], connections, seconds,
                                                            {"proxy": proc, "pod": server}, host=pod, prefix=client))
            for count in workers:
                runs[f"agent_{count}w"].append(_through_agent(sb, count, connections, seconds, server))
    out: dict = {"connections": connections, "seconds": seconds, "rounds": rounds, **_medians(runs)}
    for via in [v for v in runs if v != "direct"]:
        out[f"ratio_rps_{via}"] = round(out[via]["rps"] / out["direct"]["rps"], 3)
        out[f"ratio_rps_rounds_{via}"] = [round(p["rps"] / d["rps"], 3) for d, p in zip(runs["direct"], runs[via])]
    if not haproxies:
        out["haproxy"] = "skipped: no haproxy"
    return out


def _filtered_session(sb, port: int, *program: str) -> subprocess.Popen:
    """`run --steal --http-header-filter '^x-dev: me$' -- python PROGRAM...`, once the pod's `port`
    answers a matching request from the program ("hello from local")."""
    from mirrord_tun.sandbox import ADDRS, PY

    argv = sb.run_args(*PY, *program)
    argv[argv.index("--"):argv.index("--")] = ["--steal", "--http-header-filter", "^x-dev: me$"]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sb.procs.append(run)
    deadline = time.monotonic() + 30
    while not sb.exec("client", "curl", "-sS", "--max-time", "2", "-H", "x-dev: me",
                      f"http://{ADDRS['pod']}:{port}/").stdout.startswith("hello from local"):
        if time.monotonic() > deadline or run.poll() is not None:
            sb.stop(run)
            raise RuntimeError("the filtered steal did not start")
        time.sleep(0.2)
    return run


def _through_agent(sb, workers: int, connections: int, seconds: int, server: subprocess.Popen) -> dict[str, float]:
    """One wrk run through a fresh agent with `workers` proxy workers and a filtered steal of port 80."""
    from mirrord_tun.sandbox import ADDRS

    guard = sb.start_agent("--steal-proxy-workers", str(workers), stderr=subprocess.DEVNULL)
    try:
        run = _filtered_session(sb, STOLEN, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", str(STOLEN), "local")
        try:
            return _wrk_cpu(STOLEN, connections, seconds, {"proxy": guard, "pod": server}, host=ADDRS["pod"],
                            prefix=("ip", "netns", "exec", sb.ns("client")))
        finally:
            sb.stop(run)
    finally:
        sb.stop(guard)


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50": round(median(values), 3), "p99": round(percentile(values, 99), 3)}


def measure(requests: int, mb: int, rounds: int) -> dict:
    pod, pod_port = _start("serve", "pod")
    local, local_port = _start("serve", "local")
    proxy, proxy_port = _start("proxy", str(pod_port), str(local_port))
    try:
        body = memoryview(os.urandom(mb * 1024 * 1024))
        runs: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(rounds):
            for via, port in (("direct", pod_port), ("proxy", proxy_port)):
                runs[f"{via}_new_conn_ms"] += _latency(port, requests, keepalive=False)
                runs[f"{via}_keepalive_ms"] += _latency(port, requests, keepalive=True)
                runs[f"{via}_cl_gbits"].append(_post(port, body, chunked=False))
                runs[f"{via}_chunked_gbits"].append(_post(port, body, chunked=True))
            runs["proxy_matched_keepalive_ms"] += _latency(proxy_port, requests, keepalive=True, mine=True)
    finally:
        _stop(proxy, pod, local)
    out: dict = {}
    for key, values in runs.items():
        out[key] = _ms(values) if key.endswith("_ms") else round(median(values), 2)
    for kind in ("new_conn_ms", "keepalive_ms"):
        out[f"added_{kind.replace('_ms', '')}_p50_ms"] = round(out[f"proxy_{kind}"]["p50"] - out[f"direct_{kind}"]["p50"], 3)
    for kind in ("cl_gbits", "chunked_gbits"):
        out[f"ratio_{kind.replace('_gbits', '')}_throughput"] = round(out[f"proxy_{kind}"] / out[f"direct_{kind}"], 3)
    return out


# --------------------------------------------------------------------------- parsers
def parsers(heads: int = 20000, mb: int = 100) -> dict:
    """µs per small head and MB/s through a chunked body, h11 vs httptools."""
    import h11
    import httptools

    head = (b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: svc.default\r\nUser-Agent: bench/1.0\r\n"
            b"Accept: */*\r\nX-Dev: other\r\nCookie: a=1; b=2\r\n\r\n")
    piece = os.urandom(256 * 1024)
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    count = mb * 4
    chunked_head = b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

    def h11_head() -> None:
        c = h11.Connection(h11.SERVER)
        c.receive_data(head)
        c.next_event()
        c.trailing_data

    class Sink:
        """What a relay would register: the body bytes only counted."""

        done = False
        body = 0

        def on_body(self, data: bytes) -> None:
            self.body += len(data)

        def on_message_complete(self) -> None:
            self.done = True

    def httptools_head() -> None:
        httptools.HttpRequestParser(Sink()).feed_data(head)

    def timed(fn, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    out = {"h11_head_us": round(timed(h11_head, heads) / heads * 1e6, 1),
           "httptools_head_us": round(timed(httptools_head, heads) / heads * 1e6, 1)}

    c = h11.Connection(h11.SERVER)
    c.receive_data(chunked_head)
    c.next_event()
    t0 = time.perf_counter()
    for _ in range(count):
        c.receive_data(chunk)
        while c.next_event() is not h11.NEED_DATA:
            pass
        c.trailing_data
    out["h11_chunked_MBps"] = round(mb * 1.048576 / (time.perf_counter() - t0), 0)

    p = httptools.HttpRequestParser(Sink())
    p.feed_data(chunked_head)
    t0 = time.perf_counter()
    for _ in range(count):
        p.feed_data(chunk)
    out["httptools_chunked_MBps"] = round(mb * 1.048576 / (time.perf_counter() - t0), 0)
    return out


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        return _serve(*sys.argv[2:])
    if sys.argv[1:2] == ["proxy"]:
        return _proxy(*map(int, sys.argv[2:4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="small requests per kind and round")
    ap.add_argument("--mb", type=int, default=100, help="POST body size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--connections", type=int, default=200, help="wrk's keep-alive clients")
    ap.add_argument("--seconds", type=int, default=5, help="per wrk run")
    ap.add_argument("--agent-workers", metavar="N,N,...",
                    help="only wrk through the real agent in a sandbox (root), once per proxy worker count given "
                         "(`agent --steal-proxy-workers`), against the pod's server straight and haproxy")
    ap.add_argument("--wrk-only", action="store_true", help="only the wrk comparison")
    ap.add_argument("--server", choices=("python", "nginx", "busybox"), default="python",
                    help="the pod's server (and the program's) for the wrk comparison (busybox httpd: a new "
                         "connection per request)")
    ap.add_argument("--redis", action="store_true",
                    help="only Redis next to a filtered steal (root: a sandbox with the agent; redis-server, "
                         "redis-benchmark, curl)")
    args = ap.parse_args()
    if args.agent_workers:
        counts = [int(n) for n in args.agent_workers.split(",")]
        print(json.dumps(agent_load(counts, args.connections, args.seconds, args.rounds), indent=1))
        return
    if args.redis:
        print(json.dumps(redis(args.rounds, args.requests * 100), indent=1))
        return
    if args.wrk_only:
        w = load(args.connections, args.seconds, args.rounds, args.server)
        print(json.dumps(w, indent=1))
        return
    result = {"proxy": measure(args.requests, args.mb, args.rounds), "parsers": parsers(mb=args.mb),
              "wrk": load(args.connections, args.seconds, args.rounds, args.server)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    r = result["proxy"]
    for kind in ("new_conn", "keepalive"):
        d, p = r[f"direct_{kind}_ms"], r[f"proxy_{kind}_ms"]
        print(f"{kind:10} p50 {d['p50']:.3f} -> {p['p50']:.3f} ms (+{r[f'added_{kind}_p50_ms']:.3f}), "
              f"p99 {d['p99']:.3f} -> {p['p99']:.3f} ms")
    m = r["proxy_matched_keepalive_ms"]
    print(f"matched    p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms (keep-alive, to the local server)")
    for kind in ("cl", "chunked"):
        print(f"{args.mb} MB POST {kind:7}: direct {r[f'direct_{kind}_gbits']:.2f} Gbit/s, "
              f"proxy {r[f'proxy_{kind}_gbits']:.2f} Gbit/s (x{r[f'ratio_{kind}_throughput']})")
    w = result["wrk"]
    print(f"wrk {w['connections']} keep-alive clients, {w['server']} server: "
          f"direct {w['direct']['rps']:.0f} req/s p50 {w['direct']['p50_ms']} p99 {w['direct']['p99_ms']} ms; proxy "
          f"(to the pod) {w['proxy']['rps']:.0f} req/s p50 {w['proxy']['p50_ms']} p99 {w['proxy']['p99_ms']} ms "
          f"(x{w['ratio_rps']} req/s, rounds {w['ratio_rps_rounds']}, x{w['ratio_p99']} p99); matched "
          f"{w['proxy_matched']['rps']:.0f} req/s")
    print(f"CPU per request: proxy {w['proxy']['proxy_cpu_us']} us, the pod's server {w['direct']['pod_cpu_us']} us "
          f"direct and {w['proxy']['pod_cpu_us']} us behind the proxy")
    report_haproxy(w)
    print("parsers:", json.dumps(result["parsers"]))


if __name__ == "__main__":
    main()
