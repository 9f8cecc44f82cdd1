#!/usr/bin/env python3
"""Mirror benchmark: what the pod serves with mirroring on vs off, and what reaches the program.

    sudo .venv/bin/python scripts/bench_mirror.py [--rounds N] [--requests N] [--max-body BYTES]
    sudo .venv/bin/python scripts/bench_mirror.py --wrk [--rounds BLOCKS] [--seconds S]

On one sandbox (mirrord_tun.sandbox), a Python HTTP server in the pod answers
POSTs from the client namespace. Each round measures, first without a `run`
session and then with `mirrord-ns run -- recorder` mirroring the pod's port:

- load: REQUESTS POSTs with random bodies 0..MAX_BODY, 20 at a time -> requests/s
  and MB/s the pod served (client-side wall time);
- latency: LATENCY_REQUESTS small POSTs one at a time -> the pod's p50 and p99;
- with mirroring: the share of the load's requests that reached the program
  byte-identical, and the mirrored payload rate (bytes delivered locally over the
  time from the load's start to the last delivery).

`measure(sb)` is the entry point scripts/bench calls with its own sandbox; it
returns a dict of the medians over the rounds.

`--wrk`: many small requests instead (wrk against nginx, mirror off and on in short
interleaved rounds): scripts/bench_mirror_wrk.py.

CPUs (`--layout`, with two or more CPUs): in a cluster the pod and the
developer's laptop do not share two cores.
- split (default): the client and the pod's server on CPU 0, the whole mirror
  path (agent, `run`, the program) on the others: what the capture costs the pod
  itself, not a contest for one core;
- node: the agent joins the pod on CPU 0, as on a busy node, `run` and the
  program (the laptop) stay on the others;
- shared: everything on every CPU, the single-machine worst case.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import child_pids, median, percentile  # noqa: E402

from mirrord_tun.sandbox import ADDRS, Sandbox  # noqa: E402

PORT = 8080
PY = sys.executable
CONCURRENCY = 20
LATENCY_REQUESTS = 300
DELIVERY_WAIT = 120.0  # for the last copies to reach the program after the load


LAYOUTS = ("split", "node", "shared")


class Cpus:
    """Where the load (client, pod), the agent and the laptop side (run, program) may run."""

    def __init__(self, layout: str) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.layout = layout if len(cpus) > 1 else "shared"
        self.split = self.layout != "shared"
        self.load = cpus[:1] if self.split else cpus
        self.local = cpus[1:] if self.split else cpus
        self.agent = self.load if self.layout == "node" else self.local

    def prefix(self, cpus: list[int]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, cpus))] if self.split else []

    def pin(self, pid: int, cpus: list[int]) -> None:
        """Every thread of pid and its descendants; threads made later inherit it."""
        if not self.split:
            return
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), cpus)
        for child in child_pids(pid):
            self.pin(child, cpus)


def _load(sb: Sandbox, cpus: Cpus, count: int, concurrency: int, max_body: int, seed: int,
          path: str = "/") -> dict[str, Any]:
    out = sb.exec("client", *cpus.prefix(cpus.load), PY, "-m", "mirrord_tun.sandbox.loadgen",
                  f"http://{ADDRS['pod']}:{PORT}{path}", str(count), str(concurrency), str(max_body), str(seed),
                  timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _served(sb: Sandbox, cpus: Cpus, requests: int, max_body: int, seed: int) -> dict[str, Any]:
    started = time.time()
    load = _load(sb, cpus, requests, CONCURRENCY, max_body, seed)
    ok = [r for r in load["results"] if r["status"] == 200 and r["answer"].startswith(r["sha"])]
    lat = _load(sb, cpus, LATENCY_REQUESTS, 1, 1024, seed + 1000, path="/latency")
    lats = [r["latency"] * 1e3 for r in lat["results"]]
    return dict(started=started, results=load["results"], answered=len(ok) / len(load["results"]),
                req_s=len(ok) / load["wall"], mb_s=sum(r["len"] for r in ok) / load["wall"] / 1e6,
                p50_ms=median(lats), p99_ms=percentile(lats, 99))


class _Mirrored:
    """`mirrord-ns run -- recorder` in the laptop namespace for one round."""

    def __init__(self, sb: Sandbox, cpus: Cpus, name: str) -> None:
        self.sb = sb
        self.record = os.path.join(sb.dir, f"{name}.jsonl")
        open(self.record, "w").close()
        argv = sb.run_args(PY, "-m", "mirrord_tun.sandbox.recorder", "tcp", str(PORT), self.record)
        self.proc = subprocess.Popen([*cpus.prefix(cpus.local), *argv], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        sb.procs.append(self.proc)
        deadline = time.monotonic() + 30
        while not any(r.get("path") == "/probe" for r in self.records(probes=True)):
            if time.monotonic() > deadline:
                raise RuntimeError("the mirror never delivered a probe request")
            _load(sb, cpus, 1, 1, 16, 0, path="/probe")
            time.sleep(0.3)

    def records(self, probes: bool = False) -> list[dict[str, Any]]:
        with open(self.record) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if probes or r.get("path") == "/"]

    def delivered(self, sent: list[dict[str, Any]], started: float) -> dict[str, float]:
        want = {r["sha"] for r in sent}
        deadline = time.monotonic() + DELIVERY_WAIT
        while len(self.records()) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.5)
        got = [r for r in self.records() if r["sha"] in want and r["complete"]]
        # Identical bodies (the empty one) count once per arrival, up to how often they were sent.
        share = min(len(got), len(sent)) / len(sent)
        last = max((r["at"] for r in got), default=started)
        return dict(delivered=share, mirrored_mb_s=sum(r["len"] for r in got) / max(last - started, 1e-9) / 1e6)

    def stop(self) -> None:
        self.sb.stop(self.proc, signal.SIGTERM, wait=20)


def measure(sb: Sandbox, agent_pid: int, rounds: int = 2, requests: int = 200, max_body: int = 4 << 20,
            layout: str = "split") -> dict[str, Any]:
    """Run the mirror benchmark on a built sandbox whose agent (agent_pid) runs; medians over rounds."""
    cpus = Cpus(layout)
    cpus.pin(agent_pid, cpus.agent)
    pod = sb.start_ready("pod", [PY, "-m", "mirrord_tun.sandbox.http_server", "0.0.0.0", str(PORT), "pod"])
    cpus.pin(pod.pid, cpus.load)
    rows: list[dict[str, Any]] = []
    for i in range(rounds):
        off = _served(sb, cpus, requests, max_body, seed=10 + i)
        mirror = _Mirrored(sb, cpus, f"bench{i}")
        try:
            on = _served(sb, cpus, requests, max_body, seed=10 + i)
            on.update(mirror.delivered(on["results"], on["started"]))
        finally:
            mirror.stop()
        rows.append(dict(off=off, on=on))
    def pick(side: str, key: str) -> float:
        return median(r[side][key] for r in rows)

    out: dict[str, Any] = {"rounds": rounds, "requests": requests, "max_body": max_body, "layout": cpus.layout}
    for key in ("req_s", "mb_s", "p50_ms", "p99_ms", "answered"):
        out[f"{key}_off"], out[f"{key}_on"] = pick("off", key), pick("on", key)
    out["req_s_ratio"] = out["req_s_on"] / out["req_s_off"]
    out["p50_ratio"] = out["p50_ms_on"] / out["p50_ms_off"]
    out["delivered"] = pick("on", "delivered")
    out["mirrored_mb_s"] = pick("on", "mirrored_mb_s")
    out["mirrored_gbit_s"] = out["mirrored_mb_s"] * 8 / 1e3
    return out


def report(r: dict[str, Any]) -> str:
    lines = [(f"mirror benchmark: {r['rounds']} rounds of {r['requests']} POSTs, bodies 0..{r['max_body']} B, "
               f"{CONCURRENCY} at a time; latency: {LATENCY_REQUESTS} sequential small POSTs (medians); "
              f"CPU layout {r['layout']}"),
             f"{'':24}{'mirror off':>12}{'mirror on':>12}{'on/off':>10}"]
    for key, label in (("req_s", "pod requests/s"), ("mb_s", "pod MB/s"), ("p50_ms", "pod p50 latency ms"),
                       ("p99_ms", "pod p99 latency ms"), ("answered", "pod answered share")):
        off, on = r[f"{key}_off"], r[f"{key}_on"]
        lines.append(f"{label:24}{off:12.3f}{on:12.3f}{on / off if off else float('nan'):10.3f}")
    lines.append(f"{'delivered locally':24}{'':12}{r['delivered']:12.3f}")
    lines.append(f"{'mirrored payload':24}{'':12}{r['mirrored_mb_s']:9.1f} MB/s ({r['mirrored_gbit_s']:.2f} Gbit/s)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="with --wrk: blocks of off,on,on,off rounds")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-body", type=int, default=4 << 20)
    ap.add_argument("--layout", choices=LAYOUTS, default="split", help="where load and mirror run (see above)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    ap.add_argument("--wrk", action="store_true", help="wrk against nginx instead of POST bodies (see above)")
    ap.add_argument("--seconds", type=float, default=3, help="with --wrk: length of each round")
    ap.add_argument("--busy-off", action="store_true",
                    help="with --wrk: the mirror's CPUs spin during the 'off' rounds (a control)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_mirror: needs root (namespaces)", file=sys.stderr)
        return 2
    import bench_mirror_wrk  # it imports this module's Cpus

    with Sandbox() as sb:
        agent = sb.start_agent()
        if args.wrk:
            result = bench_mirror_wrk.measure_wrk(sb, agent.pid, args.rounds, args.seconds, layout=args.layout,
                                                  busy_off=args.busy_off)
        else:
            result = measure(sb, agent.pid, args.rounds, args.requests, args.max_body, layout=args.layout)
    print(bench_mirror_wrk.report_wrk(result) if args.wrk else report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
