"""The bench's WAN scenario: a delaying relay and random loss on the path to the node.

    laptop ──(1% loss, nft in the laptop namespace)── relay in the node namespace (+10 ms each way)
        :12222 -> the agent (198.19.0.2:2222)     mirrord-ns run
        :10022 -> sshd (198.19.0.2:22)            sshuttle, ssh -L
        :25201 -> iperf3 on the svc, :28080 -> its HTTP server     "direct with the same WAN"

Every tool's outer TCP connection crosses the same relay and the same loss, in the
same run. The loss applies to the laptop <-> relay leg (both directions, every packet of
the relayed ports, GSO off on that link so a dropped packet is one segment, not a 64 KB
burst). The relay ends TCP on either side, so that leg's kernels repair losses at its own
short round trip; the 20 ms is what the bytes, and any TCP carried inside them, see.
`Wan` records what it made and `close()` removes it (the relay by PID, the nft table);
the Sandbox's own teardown covers both as well.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import benchlib as bl
from mirrord_tun.sandbox import ADDRS, AGENT_PORT, NODE_UPLINK

RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
PORTS = {"agent": 12222, "ssh": 10022, "iperf": 25201, "http": 28080}
TABLE = "mrds_wan"


class Wan:
    def __init__(self, sb: Any, delay_ms: float = 10.0, loss_pct: int = 1) -> None:
        self.sb, self.delay_ms, self.loss_pct = sb, delay_ms, loss_pct
        self.relay: Any = None
        self._table = False
        self._gso: list[tuple[str, str, str]] = []  # (role, device, gso_max_segs before)

    @property
    def agent(self) -> str:
        return f"{NODE_UPLINK}:{PORTS['agent']}"

    @property
    def ssh(self) -> tuple[str, int]:
        return NODE_UPLINK, PORTS["ssh"]

    def start(self) -> "Wan":
        targets = {"agent": (NODE_UPLINK, AGENT_PORT), "ssh": (NODE_UPLINK, 22),
                   "iperf": (ADDRS["svc"], bl.IPERF_PORT), "http": (ADDRS["svc"], 80)}
        self.relay = start_relay(self.sb, [f"{PORTS[k]}={h}:{p}" for k, (h, p) in targets.items()], self.delay_ms)
        for role, dev in (("laptop", "eth0"), ("node", "uplink")):
            self._gso.append((role, dev, _gso_segs(self.sb, role, dev)))
            _ip(self.sb, role, "link", "set", "dev", dev, "gso_max_segs", "1")
        ports = ", ".join(str(p) for p in PORTS.values())
        lose = f"numgen random mod 100 < {self.loss_pct} counter drop"
        rules = f"""table inet {TABLE} {{
  chain out {{ type filter hook output priority 0; policy accept;
    ip daddr {NODE_UPLINK} tcp dport {{ {ports} }} counter {lose}
  }}
  chain in {{ type filter hook input priority 0; policy accept;
    ip saddr {NODE_UPLINK} tcp sport {{ {ports} }} counter {lose}
  }}
}}
"""
        p = self.sb.exec("laptop", "nft", "-f", "-", input=rules)
        if p.returncode != 0:
            raise RuntimeError(f"nft (WAN loss): {p.stderr.strip()}")
        self._table = True
        return self

    def loss(self) -> dict[str, Any]:
        """Packets seen and dropped on the lossy leg so far, per direction."""
        p = self.sb.exec("laptop", "nft", "list", "table", "inet", TABLE)
        out: dict[str, Any] = {}
        for chain, body in re.findall(r"chain (\w+) \{(.*?)\n\t\}", p.stdout, re.S):
            counts = [int(x) for x in re.findall(r"counter packets (\d+)", body)]
            if len(counts) == 2:
                out[chain] = {"packets": counts[0], "dropped": counts[1],
                              "pct": round(100 * counts[1] / counts[0], 2) if counts[0] else None}
        return out

    def close(self) -> None:
        if self.relay is not None:
            self.sb.stop(self.relay)
            self.relay = None
        if self._table:
            self.sb.exec("laptop", "nft", "delete", "table", "inet", TABLE)
            self._table = False
        for role, dev, segs in self._gso:
            if segs:
                self.sb.exec(role, "ip", "link", "set", "dev", dev, "gso_max_segs", segs)
        self._gso.clear()


def start_relay(sb: Any, forwards: list[str], delay_ms: float) -> Any:
    """relay.py in the node namespace, listening on the uplink address; stopped by PID."""
    return sb.start_ready("node", [sys.executable, RELAY, "--delay-ms", str(delay_ms), "--listen", NODE_UPLINK,
                                   *forwards], stderr=None)


def _ip(sb: Any, role: str, *args: str) -> None:
    p = sb.exec(role, "ip", *args)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} in {role}: {p.stderr.strip()}")


def _gso_segs(sb: Any, role: str, dev: str) -> str:
    p = sb.exec(role, "ip", "-d", "link", "show", "dev", dev)
    m = re.search(r"gso_max_segs (\d+)", p.stdout)
    return m[1] if m else ""


def report(r: dict[str, Any], table: list[str]) -> str:
    w = r.get("wan", {})
    loss = w.get("loss", {})
    seen = ", ".join(f"{d} {v['dropped']}/{v['packets']} packets ({v['pct']}%)"
                     for d, v in loss.items() if v.get("packets"))
    head = [f"WAN scenario: relay +{w.get('delay_ms', 0):g} ms each way, {w.get('loss_pct')}% random loss on the "
            f"laptop<->relay leg (dropped: {seen or '-'})",
            "  a = iperf3/HTTP from the laptop through the same relay and loss, no tunnel "
            "(its TCP handshake ends at the relay: one round trip less than the tunnels pay per new connection)"]
    return "\n".join(head + table)
