#!/usr/bin/env python3
"""Steal benchmark: what the filtered steal costs the requests it leaves to the pod, and
what a stolen request costs, in one run.

    sudo .venv/bin/python scripts/bench_steal.py [--requests N] [--body-mib N]

On one sandbox (mirrord_tun.sandbox) with the agent running, the pod serves HTTP on
PORT (the sandbox's Python server). From the client namespace, on one keep-alive
connection each:
- direct: REQUESTS GETs (p50, p99) and POSTs of BODY_MIB MiB (Gbit/s, the pod hashing the
  body) to the pod, nothing stolen;
- then under `mirrord-ns run --steal --http-header-filter 'x-mirrord-user: me'` (the
  program: the same server, in the laptop namespace): the same GETs and POSTs without
  the header (through the agent's proxy, answered by the pod), GETs on new connections
  each, and GETs with the header (stolen: through the tunnel to the program).

`measure(sb)` is the entry point scripts/bench calls with its own sandbox and agent.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median, percentile  # noqa: E402

from mirrord_tun.sandbox import ADDRS, PY, Sandbox  # noqa: E402

PORT = 8082
HEADER = "x-mirrord-user: me"
READY_TIMEOUT = 30.0
# The sandbox's server with TCP_NODELAY: it writes a response's head and body apart, and
# Nagle's wait for the delayed ACK would measure 40 ms per keep-alive request on every path.
_SERVER = """
from mirrord_tun.sandbox import http_server
http_server.Handler.disable_nagle_algorithm = True
http_server.main()
"""
SERVER = [*PY, "-c", _SERVER, "0.0.0.0", str(PORT)]

# Prints one JSON object: per-request milliseconds of GETs (keep-alive and new
# connections) and the seconds each POST of the body took.
_CLIENT = r"""
import http.client, json, os, sys, time
host, port, n, body_mib, header = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
headers = dict([header.split(": ", 1)]) if header else {}
c = http.client.HTTPConnection(host, port, timeout=30)
def get(conn):
    t = time.perf_counter()
    conn.request("GET", "/", headers=headers)
    conn.getresponse().read()
    return (time.perf_counter() - t) * 1000
for _ in range(20):
    get(c)
out = {"keepalive_ms": [get(c) for _ in range(n)], "new_ms": [], "post_s": []}
for _ in range(n // 2):
    fresh = http.client.HTTPConnection(host, port, timeout=30)
    out["new_ms"].append(get(fresh))
    fresh.close()
body = os.urandom(1 << 20) * body_mib
for _ in range(3 if body_mib else 0):
    t = time.perf_counter()
    c.request("POST", "/", body=body, headers=headers)
    c.getresponse().read()
    out["post_s"].append(time.perf_counter() - t)
print(json.dumps(out))
"""


def _client(sb: Sandbox, requests: int, body_mib: int, header: str = "") -> dict[str, Any]:
    r = sb.exec("client", sys.executable, "-c", _CLIENT, ADDRS["pod"], str(PORT), str(requests), str(body_mib),
                header, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"steal bench client failed: {r.stderr.strip()[-300:]}")
    raw = json.loads(r.stdout)
    out: dict[str, Any] = {}
    for key in ("keepalive_ms", "new_ms"):
        if raw[key]:
            out[key.replace("_ms", "")] = {"p50_ms": round(median(raw[key]), 3),
                                           "p99_ms": round(percentile(raw[key], 99), 3)}
    if raw["post_s"]:
        out["post_gbits"] = round(body_mib * 8 * 1.048576 / 1000 / median(raw["post_s"]), 2)
    return out


def _wait_stolen(sb: Sandbox, run: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        r = sb.exec("client", "curl", "-sS", "--max-time", "2", "-H", HEADER, f"http://{ADDRS['pod']}:{PORT}/")
        if r.stdout.startswith("hello from local"):
            return
        if run.poll() is not None:
            raise RuntimeError(f"mirrord-ns run --steal exited {run.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"the filtered steal did not start within {READY_TIMEOUT:g} s")


def measure(sb: Sandbox, requests: int = 300, body_mib: int = 64, env: dict[str, str] | None = None) -> dict[str, Any]:
    pod = sb.start_ready("pod", [*SERVER, "pod"])
    try:
        result: dict[str, Any] = {"requests": requests, "body_mib": body_mib,
                                  "direct": _client(sb, requests, body_mib)}
        argv = sb.run_args(*SERVER, "local")
        argv[argv.index("--"):argv.index("--")] = ["--steal", "--http-header-filter", HEADER, "--http-filter-ports", str(PORT)]
        run = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        sb.procs.append(run)
        try:
            _wait_stolen(sb, run)
            result["unmatched"] = _client(sb, requests, body_mib)
            result["stolen"] = _client(sb, requests, 0, HEADER)
        finally:
            sb.stop(run)
    finally:
        sb.stop(pod)
    return result


def report(r: dict[str, Any]) -> str:
    d, u, s = r["direct"], r["unmatched"], r["stolen"]
    added = u["keepalive"]["p50_ms"] - d["keepalive"]["p50_ms"]
    return "\n".join([
        f"steal (HTTP filter), {r['requests']} GETs per line, POSTs of {r['body_mib']} MiB:",
        f"  pod, direct                 keep-alive p50 {d['keepalive']['p50_ms']:.3f} ms  p99 "
        f"{d['keepalive']['p99_ms']:.3f}  new connection p50 {d['new']['p50_ms']:.3f} ms  POST {d['post_gbits']} Gbit/s",
        f"  pod, through the filter     keep-alive p50 {u['keepalive']['p50_ms']:.3f} ms  p99 "
        f"{u['keepalive']['p99_ms']:.3f}  new connection p50 {u['new']['p50_ms']:.3f} ms  POST {u['post_gbits']} Gbit/s",
        f"  stolen, through the tunnel  keep-alive p50 {s['keepalive']['p50_ms']:.3f} ms  p99 "
        f"{s['keepalive']['p99_ms']:.3f}  new connection p50 {s['new']['p50_ms']:.3f} ms",
        f"  [{'ok' if added <= 0.5 else 'MISS'}] unmatched requests' added p50 <= 0.5 ms: {added:+.3f} ms; "
        f"[{'ok' if u['post_gbits'] >= 1 else 'MISS'}] large bodies through the filter >= 1 Gbit/s",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--body-mib", type=int, default=64)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_steal: needs root (namespaces)")
    with Sandbox() as sb:
        sb.start_agent()
        print(report(measure(sb, args.requests, args.body_mib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
