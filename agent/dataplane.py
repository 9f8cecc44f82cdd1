"""What one session puts into the target's namespace, and how it is all taken out.

Per session: a TUN `mrd<sid>` carrying a /30 from 100.64.0.0/10 (agent .1, client
.2), an nft table `mirrord_ns_<sid>` that masquerades the client address as the
pod, and net.ipv4.ip_forward=1 — or, where /proc/sys is read-only (an
unprivileged container), forwarding set per device over rtnetlink on the TUN and
the links replies come in on. The table's comment records the owning agent
process and the forwarding found before any session touched it (the sysctl, and
the links that had it off), so that whoever removes the last table (the session,
the agent's guard, or the next agent start) can put forwarding back. The TUN needs no cleanup: it vanishes with
the fd. Every function runs in the target namespace's thread.
"""
from __future__ import annotations

import contextlib
import ipaddress
import random
import re
from typing import NamedTuple

from mirrord_tun.agent import owner
from mirrord_tun.netns import links, nft
from mirrord_tun.netns.tun import Tun

TABLE_PREFIX = "mirrord_ns_"
TUN_PREFIX = "mrd"
TUNNEL_NET = ipaddress.IPv4Network("100.64.0.0/10")
_COMMENT = re.compile(r"owner=(\S+) fwd=([01])(?: dev=(\S*))?")


class SessionPlane:
    """The kernel state of one session; `close()` removes all of it."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.table = TABLE_PREFIX + sid
        self.tun: Tun | None = None
        self.agent_addr = self.client_addr = ""
        self.mtu = 1500
        self.pod_addrs: list[str] = []

    def open(self) -> None:
        block = _free_block()
        self.agent_addr, self.client_addr = str(block[1]), str(block[2])
        self.pod_addrs = links.ipv4_addresses(exclude_prefix=TUN_PREFIX)
        self.mtu = links.uplink_mtu()
        try:
            self.tun = Tun(TUN_PREFIX + self.sid)
            links.bring_up_tun(self.tun.name, [self.agent_addr], self.mtu, peers=[self.client_addr])
            fwd_before, links_off = _forwarding_before_us()
            nft.run(
                f"table ip {self.table}\ndelete table ip {self.table}\n"
                f"table ip {self.table} {{\n"
                f'  comment "owner={owner.me()} fwd={int(fwd_before)} dev={",".join(links_off)}"\n'
                "  chain postrouting {\n"
                "    type nat hook postrouting priority srcnat; policy accept;\n"
                f'    ip saddr {self.client_addr} oifname != "{self.tun.name}" masquerade\n'
                "  }\n}\n"
            )
            _enable_forwarding(self.tun.name, links_off)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        _remove_tables([self.table])
        if self.tun:
            self.tun.close()
            self.tun = None


def _free_block() -> ipaddress.IPv4Network:
    used = links.ipv4_in_use()
    for _ in range(64):
        n = random.randrange(TUNNEL_NET.num_addresses // 4)
        block = ipaddress.IPv4Network((int(TUNNEL_NET.network_address) + 4 * n, 30))
        if not any(block.overlaps(u) for u in used if u.prefixlen > 0):
            return block
    raise RuntimeError("no free /30 left in 100.64.0.0/10 in the target namespace")


class _Record(NamedTuple):
    owner: str
    forwarding: bool  # net.ipv4.ip_forward before the first session
    links_off: list[str]  # links whose forwarding was off before the first session


def _ours() -> dict[str, _Record]:
    """Our tables in this namespace and what their comments record."""
    out = {}
    for name, comment in nft.tables("ip", TABLE_PREFIX).items():
        m = _COMMENT.search(comment)
        # Without a record, assume forwarding was on: never switch off what we cannot prove we switched on.
        out[name] = _Record(m[1], m[2] == "1", [d for d in (m[3] or "").split(",") if d]) if m \
            else _Record("", True, [])
    return out


def _forwarding_before_us() -> tuple[bool, list[str]]:
    existing = list(_ours().values())
    if existing:
        return all(r.forwarding for r in existing), sorted({d for r in existing for d in r.links_off})
    return links.read_ip_forward(), [d for d in links.links_except(TUN_PREFIX) if not links.device_forwarding(d)]


def _enable_forwarding(tun: str, links_off: list[str]) -> None:
    try:
        links.write_ip_forward(True)
    except OSError:  # read-only /proc/sys: the same effect per device
        for name in [tun, *links_off]:
            links.set_device_forwarding(name, True)


def _remove_tables(names: list[str]) -> None:
    tables = _ours()
    doomed = [n for n in names if n in tables]
    for name in doomed:
        nft.delete_table("ip", name)
    if doomed and not set(tables) - set(doomed):
        with contextlib.suppress(OSError):
            links.write_ip_forward(all(tables[n].forwarding for n in doomed))
        present = set(links.links_except(TUN_PREFIX))
        for name in sorted({d for n in doomed for d in tables[n].links_off} & present):
            links.set_device_forwarding(name, False)


def remove_leftovers() -> list[str]:
    """Remove tables whose owning agent is gone (crash, OOM, SIGKILL); idempotent."""
    dead = [name for name, record in _ours().items() if not owner.alive(record.owner)]
    _remove_tables(dead)
    return dead
