"""The bench's soak mode (`scripts/bench --soak MINUTES`): does anything grow over time?

Two `mirrord-ns run` sessions against one agent, each running an HTTP client that
GETs the svc every 50 ms (a new connection each). Their SSH connections go through a
relay in the node namespace (scripts/relay.py) that is killed every minute and
started again after a short outage, which drops both connections. A `run` that
survives (reconnect and resume) keeps its session and PID; one that exits is
counted, its last stderr line kept, and started again. Every 10 s the RSS and open
fds of the agent worker and of each `run` are sampled; growth is reported from the
first sample (10 s in, past start-up) to the last, per process incarnation.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import benchlib as bl
import bench_wan
from mirrord_tun.sandbox import ADDRS, AGENT_PORT, NODE_UPLINK

SAMPLE_S, CUT_EVERY_S, OUTAGE_S, REQUEST_EVERY_S = 10.0, 60.0, 3.0, 0.05
SESSIONS = ("run1", "run2")
TARGET = {"rss_mib": 5.0, "fds": 0}


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Session:
    """One `mirrord-ns run` with its request loop, restarted when it exits."""

    def __init__(self, name: str, argv: list[str], workdir: str) -> None:
        self.name, self.argv = name, argv
        self.out = os.path.join(workdir, f"{name}.out")
        self.err = os.path.join(workdir, f"{name}.err")
        self.proc: subprocess.Popen | None = None
        self.exits: list[dict[str, Any]] = []
        self.totals = {"ok": 0, "fail": 0, "slowest_s": 0.0}  # of incarnations that ended
        self.started = 0.0

    def start(self, now: float) -> None:
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)
        self.started = now

    def counts(self) -> dict[str, float]:
        """Requests of the running incarnation so far (its client's last report line)."""
        try:
            lines = open(self.out).read().split("\n")
        except FileNotFoundError:
            lines = []
        for line in reversed(lines):
            try:
                d = json.loads(line)
                return {k: d[k] for k in ("ok", "fail", "slowest_s")}
            except (ValueError, KeyError):
                continue
        return {"ok": 0, "fail": 0, "slowest_s": 0.0}

    def reap(self, now: float) -> bool:
        """Note and forget an exited `run`; True if it had exited."""
        if self.proc is None or self.proc.poll() is None:
            return False
        err = open(self.err, errors="replace").read().strip().splitlines()
        self.exits.append({"t": round(now, 1), "code": self.proc.returncode, "said": err[-1][-200:] if err else ""})
        self._forget()
        return True

    def stop(self) -> None:
        """End the soak's incarnation (not counted as an exit)."""
        if self.proc is not None:
            bl.stop_process(self.proc, wait=8)
            self._forget()

    def _forget(self) -> None:
        c = self.counts()
        for k in ("ok", "fail"):
            self.totals[k] += c[k]
        self.totals["slowest_s"] = max(self.totals["slowest_s"], c["slowest_s"])
        self.proc = None


def _sample(pid: int | None) -> dict[str, int] | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"pid": pid, "rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None


def soak(sb: Any, agent_worker: Callable[[], int | None], minutes: float, workdir: str,
         agent_log: str) -> dict[str, Any]:
    relay_port = bench_wan.PORTS["agent"]
    forward = [f"{relay_port}={NODE_UPLINK}:{AGENT_PORT}"]
    relay = bench_wan.start_relay(sb, forward, 0)
    client = bl.poll_argv(ADDRS["svc"], 80, REQUEST_EVERY_S)
    sessions = []
    for name in SESSIONS:
        argv = sb.run_args(*client)
        argv[argv.index("--agent") + 1] = f"{NODE_UPLINK}:{relay_port}"
        sessions.append(Session(name, argv, workdir))
    res: dict[str, Any] = {"minutes": minutes, "samples": [], "cuts": []}
    log_from = os.path.getsize(agent_log) if os.path.exists(agent_log) else 0
    t0 = time.monotonic()
    for s in sessions:
        s.start(0.0)
    _log(f"soak: {len(sessions)} sessions for {minutes:g} min, the SSH path cut every {CUT_EVERY_S:g} s "
         f"for {OUTAGE_S:g} s")
    next_sample, next_cut, end = SAMPLE_S, CUT_EVERY_S, minutes * 60
    restore_at: float | None = None
    try:
        while (now := time.monotonic() - t0) < end:
            if restore_at is not None and now >= restore_at:
                relay = bench_wan.start_relay(sb, forward, 0)
                restore_at = None
            if restore_at is None and now >= next_cut:
                sb.stop(relay, signal.SIGKILL)
                res["cuts"].append(round(now, 1))
                restore_at, next_cut = now + OUTAGE_S, next_cut + CUT_EVERY_S
            for s in sessions:
                if s.reap(now):
                    _log(f"soak: {s.name} exited {s.exits[-1]['code']} at {now:.0f} s: {s.exits[-1]['said']}")
                if s.proc is None and restore_at is None:
                    s.start(now)
            if now >= next_sample:
                row: dict[str, Any] = {"t": round(now, 1), "agent": _sample(agent_worker())}
                for s in sessions:
                    row[s.name] = _sample(s.proc.pid if s.proc else None)
                    row[f"{s.name}_requests"] = s.counts()
                res["samples"].append(row)
                next_sample += SAMPLE_S
            time.sleep(0.2)
    finally:
        for s in sessions:
            s.stop()
        sb.stop(relay)
    res["sessions"] = {s.name: {"exits": s.exits, **s.totals} for s in sessions}
    res["growth"] = growth(res["samples"], ["agent", *SESSIONS])
    res["agent_log"] = agent_events(agent_log, log_from)
    return res


def agent_events(path: str, offset: int) -> dict[str, int]:
    """What the agent logged about sessions during the soak (its INFO lines)."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    return {"opened": len(re.findall(r"session \w+ from \S+: tunnel", text)),
            "resumed": len(re.findall(r"session \w+ resumed from", text)),
            "kept_after_loss": len(re.findall(r"session \w+: connection lost", text)),
            "not_resumed": len(re.findall(r"session \w+: not resumed", text)),
            "closed": len(re.findall(r"session \w+ closed:", text))}


def growth(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per process, per incarnation (PID): first and last sample, and the largest seen."""
    out: dict[str, Any] = {}
    for name in names:
        runs: dict[int, list[tuple[float, dict[str, int]]]] = {}
        for row in samples:
            if row.get(name):
                runs.setdefault(row[name]["pid"], []).append((row["t"], row[name]))
        out[name] = [{"pid": pid, "from_t": pts[0][0], "to_t": pts[-1][0], "samples": len(pts),
                      "rss_mib": [round(pts[0][1]["rss_kib"] / 1024, 1), round(pts[-1][1]["rss_kib"] / 1024, 1)],
                      "max_rss_mib": round(max(p["rss_kib"] for _, p in pts) / 1024, 1),
                      "fds": [pts[0][1]["fds"], pts[-1][1]["fds"]], "max_fds": max(p["fds"] for _, p in pts)}
                     for pid, pts in runs.items()]
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"soak: {r['minutes']:g} min, {len(SESSIONS)} sessions each GETting the svc every "
             f"{REQUEST_EVERY_S * 1000:g} ms (new connection each); SSH path cut {len(r['cuts'])} times "
             f"({OUTAGE_S:g} s outage each, at {', '.join(f'{t:g}' for t in r['cuts']) or '-'} s)"]
    ev = r.get("agent_log", {})
    lines.append("  agent: sessions opened {opened}, connections lost with the session kept {kept_after_loss}, "
                 "resumed {resumed}, not resumed {not_resumed}, closed {closed}".format(**ev) if ev else "  agent: -")
    for name, s in r["sessions"].items():
        lines.append(f"  {name}: requests ok {s['ok']}, failed {s['fail']}, slowest {s['slowest_s']:.1f} s; "
                     f"`run` exited {len(s['exits'])} times"
                     + (f" (last: code {s['exits'][-1]['code']}, \"{s['exits'][-1]['said']}\")" if s["exits"] else
                        " (survived every cut)"))
    lines.append(f"  growth, first to last sample of each process (target over 30 min: "
                 f"<= {TARGET['rss_mib']:g} MiB RSS, {TARGET['fds']} fds):")
    for name, incs in r["growth"].items():
        for g in incs:
            if g["samples"] < 2:
                continue
            d_rss = g["rss_mib"][1] - g["rss_mib"][0]
            d_fds = g["fds"][1] - g["fds"][0]
            rss = g["rss_mib"]
            lines.append(f"    {name:<6} pid {g['pid']:<7} {g['from_t']:>6.0f}-{g['to_t']:<6.0f}s  RSS "
                         f"{rss[0]:.1f} -> {rss[1]:.1f} MiB ({d_rss:+.1f}, max {g['max_rss_mib']:.1f})"
                         f"  fds {g['fds'][0]} -> {g['fds'][1]} ({d_fds:+d}, max {g['max_fds']})")
    return "\n".join(lines)
