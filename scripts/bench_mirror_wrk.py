"""The mirror under wrk: what mirroring costs the pod, from short interleaved off/on rounds.

    sudo .venv/bin/python scripts/bench_mirror.py --wrk [--rounds BLOCKS] [--seconds S] [--layout L]

nginx in the pod, wrk with WRK_CONNECTIONS keep-alive connections from the client
for S seconds per round; with the mirror on, `mirrord-ns run -v -- nginx` (default
`keepalive_requests 1000`) is the local program. Rounds go in blocks of
off, on, on, off (one `run` session spans a block's two "on" rounds), so a drift
of the machine's speed during a block hits both sides of its two pairs
(off0/on1, on2/off3) alike; the result is the median and range of the per-pair
ratios.

Per round: the pod's requests/s (wrk), and the pod side's CPU per request: wrk's
(its rusage) plus the pod's nginx's (utime+stime from /proc). This kernel has no
IRQ time accounting, so the softirq work done in their context (the veth
receive, and with the mirror on the capture's filter and clone of each packet)
is in their stime. The pod side's CPU per request is the steadier figure: on a
shared machine the req/s also moves with how much of the load's CPU other work
takes, and a busy mirror CPU (agent, `run`, the program) pushes other
processes onto the load's CPU. "capacity on/off" is CPU per request off over
on: the requests/s the pod could serve on a core of its own, with the mirror on
relative to off. "got" is the share of the round's wall time the pod side ran.

After each "on" round the bench waits until the local nginx's access log stops
growing (every copy of that round delivered, or the closing line says why not)
before the next round starts, so a round never pays for the previous round's
copies. Agent and `run` (+ program) CPU are per mirrored request.

`--busy-off` (layouts split and node): the "off" rounds run a busy loop on each of
the mirror's CPUs. On this shared 2-core machine a busy mirror CPU alone takes
requests/s from the pod (other work moves onto the pod's CPU; caches are
shared); with the control both sides of a pair have it, so their ratio is what
the capture itself costs the pod.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench_mirror import DELIVERY_WAIT, Cpus
from benchlib import child_pids, median

from mirrord_tun.sandbox import ADDRS, Sandbox, nginx

WRK_PORT = 8081
WRK_CONNECTIONS = 200
BLOCK = ("off", "on", "on", "off")
PAIRS = ((0, 1), (3, 2))  # (off, on) indexes within a block
QUIET = 1.0  # seconds the local access log must stay still to count as settled
STALL = 10.0  # ... when it still misses requests: the rest is counted in the closing line


def _nginx(sb: Sandbox, name: str) -> tuple[list[str], str]:
    """argv of an nginx serving WRK_PORT with its files in a directory of its own, and that directory."""
    d = os.path.join(sb.dir, name)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o777)  # `run` may drop to the invoking user
    argv = nginx.configure(d, f"{WRK_PORT} reuseport backlog=4096", 'return 200 "ok";', connections=4096,
                           access_log=True)
    return argv, d


def _logged(d: str) -> int:
    try:
        with open(os.path.join(d, nginx.ACCESS_LOG), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def cpu_s(pid: int) -> float:
    """utime+stime of pid and its descendants, in seconds."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += child_pids(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _wrk(sb: Sandbox, cpus: Cpus, seconds: float, connections: int = WRK_CONNECTIONS) -> dict[str, float]:
    """One wrk run from the client: requests/s, requests, and wrk's own CPU seconds (rusage)."""
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(["ip", "netns", "exec", sb.ns("client"), *cpus.prefix(cpus.load), "wrk", "-t1",
                              f"-c{connections}", f"-d{seconds:g}s", f"http://{ADDRS['pod']}:{WRK_PORT}/"],
                             stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    req_s = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if p.returncode != 0 or not req_s or not total:
        raise RuntimeError(f"wrk failed: {text}")
    return dict(req_s=float(req_s[1]), total=int(total[1]), wrk_s=usage.ru_utime + usage.ru_stime)


class _Session:
    """`mirrord-ns run -v -- nginx` in the laptop namespace for one block's "on" rounds."""

    def __init__(self, sb: Sandbox, cpus: Cpus, name: str) -> None:
        self.sb = sb
        argv, self.dir = _nginx(sb, name)
        self.stderr = open(os.path.join(sb.dir, f"{name}.stderr"), "w+")
        self.proc = subprocess.Popen([*cpus.prefix(cpus.local), *sb.run_args(*argv, verbose=1)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        sb.procs.append(self.proc)
        deadline = time.monotonic() + 30
        while _logged(self.dir) == 0:  # the port is learned and subscribed: the probes arrive
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the mirror never delivered a probe request")
            _wrk(sb, cpus, 1, connections=1)
        self.settle()
        self.start = _logged(self.dir)
        self.sent = 0

    def settle(self, expected: int = 0) -> None:
        """Wait until the program has logged `expected` requests, or its log stopped growing
        for STALL seconds: the copies so far are delivered (or never will be)."""
        deadline = time.monotonic() + DELIVERY_WAIT
        last, still = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = _logged(self.dir)
            if now != last:
                last, still = now, time.monotonic()
            elif now >= expected and time.monotonic() - still >= QUIET or time.monotonic() - still >= STALL:
                return
            time.sleep(0.2)

    def stop(self) -> dict[str, Any]:
        delivered = (_logged(self.dir) - self.start) / max(self.sent, 1)
        self.sb.stop(self.proc, signal.SIGTERM, wait=20)
        self.stderr.seek(0)
        closing = re.findall(r"^mirrord-ns: (?:mirrored|agent): .*$", self.stderr.read(), re.M)
        self.stderr.close()
        return dict(delivered=delivered, closing=closing)


def _spinners(cpus: Cpus) -> list[subprocess.Popen[bytes]]:
    """A busy loop on each of the mirror's CPUs: an "off" round with them as busy as when on."""
    return [subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
            for cpu in cpus.local]


def _round(sb: Sandbox, cpus: Cpus, pids: dict[str, int], seconds: float,
           session: _Session | None, busy: bool) -> dict[str, Any]:
    watched = {**pids, **({"run": session.proc.pid} if session else {})}
    spin = _spinners(cpus) if busy and not session and cpus.split else []
    try:
        before = {k: cpu_s(p) for k, p in watched.items()}
        w = _wrk(sb, cpus, seconds)
        used = {k: cpu_s(p) - before[k] for k, p in watched.items()}
    finally:
        for p in spin:
            p.kill()
            p.wait()
    n = w["total"]
    # With layout node the agent shares the pod's CPU: its work is the pod side's too.
    pod_s = w["wrk_s"] + used["pod"] + (used["agent"] if session and cpus.agent == cpus.load else 0)
    row = dict(mirror=session is not None, req_s=w["req_s"], requests=n, pod_us=pod_s / n * 1e6,
               nginx_us=used["pod"] / n * 1e6, got=pod_s / seconds / len(cpus.load))
    if session:
        session.sent += n
        row.update(agent_us=used["agent"] / n * 1e6, run_us=used["run"] / n * 1e6)
        session.settle(session.start + session.sent)
    return row


def measure_wrk(sb: Sandbox, agent_pid: int, rounds: int = 3, seconds: float = 3,
                layout: str = "split", busy_off: bool = False) -> dict[str, Any]:
    """`rounds` blocks of off, on, on, off rounds of `seconds` each; per round and per pair.
    `busy_off`: the "off" rounds keep the mirror's CPUs busy with a spinner (see the top)."""
    cpus = Cpus(layout)
    cpus.pin(agent_pid, cpus.agent)
    argv, _ = _nginx(sb, "pod")
    pod = sb.start("pod", [*cpus.prefix(cpus.load), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while sb.exec("client", "wrk", "-t1", "-c1", "-d1s", f"http://{ADDRS['pod']}:{WRK_PORT}/").returncode:
        if time.monotonic() > deadline or pod.poll() is not None:
            raise RuntimeError("nginx in the pod did not start")
    pids = {"pod": pod.pid, "agent": agent_pid}
    _wrk(sb, cpus, 1)  # warm-up: nginx's and wrk's first connections, page cache
    rows: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for b in range(rounds):
        block: list[dict[str, Any]] = []
        session: _Session | None = None
        try:
            for kind in BLOCK:
                if kind == "on" and session is None:
                    session = _Session(sb, cpus, f"local{b}")
                if kind == "off" and session is not None:
                    sessions.append(session.stop())
                    session = None
                block.append(_round(sb, cpus, pids, seconds, session if kind == "on" else None, busy_off))
        finally:
            if session is not None:
                sessions.append(session.stop())
        rows += block
        for off, on in PAIRS:
            block[on]["pair_req_s"] = block[on]["req_s"] / block[off]["req_s"]
            block[on]["pair_capacity"] = block[off]["pod_us"] / block[on]["pod_us"]
    return dict(layout=cpus.layout, seconds=seconds, rows=rows, sessions=sessions, busy_off=busy_off and cpus.split)


def _spread(values: list[float]) -> str:
    return f"{median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, {len(values)} pairs)"


def report_wrk(r: dict[str, Any]) -> str:
    lines = [f"mirror under wrk: {WRK_CONNECTIONS} connections, {r['seconds']:g} s per round, blocks of "
             f"off,on,on,off; nginx in the pod and as the local program; CPU layout {r['layout']}"
             + ("; 'off' with the mirror's CPUs spinning" if r["busy_off"] else ""),
             f"{'round':>5}{'mirror':>7}{'req/s':>9}{'pod µs/req':>11}{'nginx µs':>9}{'got':>6}"
             f"{'agent µs':>9}{'run µs':>8}{'req/s on/off':>13}{'capacity on/off':>16}"]
    for i, row in enumerate(r["rows"]):
        line = (f"{i:5}{'on' if row['mirror'] else 'off':>7}{row['req_s']:9.0f}{row['pod_us']:11.2f}"
                f"{row['nginx_us']:9.2f}{row['got']:6.2f}")
        if row["mirror"]:
            line += (f"{row['agent_us']:9.2f}{row['run_us']:8.2f}{row['pair_req_s']:13.3f}"
                     f"{row['pair_capacity']:16.3f}")
        lines.append(line)
    on = [row for row in r["rows"] if row["mirror"]]
    lines += [f"pod req/s on/off:    {_spread([row['pair_req_s'] for row in on])}",
              f"capacity on/off:     {_spread([row['pair_capacity'] for row in on])}",
              f"agent µs/request:    {median(row['agent_us'] for row in on):.2f}, "
              f"run+program µs/request {median(row['run_us'] for row in on):.2f} (medians)"]
    for i, s in enumerate(r["sessions"]):
        lines.append(f"session {i}: delivered {s['delivered']:.3f} of the pod's requests")
        lines += [f"      {line}" for line in s["closing"]]
    return "\n".join(lines)
