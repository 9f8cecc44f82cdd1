"""What one session puts into the target's namespace, and how it is all taken out.

Per session: a TUN `mrd<sid>` carrying a /30 from 100.64.0.0/10 (agent .1, client
.2), an nft table `mirrord_ns_<sid>` that masquerades the client address as the
pod, and net.ipv4.ip_forward=1. The table's comment records the owning agent
process and the forwarding value found before any session touched it, so that
whoever removes the last table (the session, the agent's guard, or the next
agent start) can put forwarding back. The TUN needs no cleanup: it vanishes with
the fd. Every function runs in the target namespace's thread.
"""
from __future__ import annotations

import ipaddress
import random
import re

from mirrord_tun.agent import owner
from mirrord_tun.netns import links, nft
from mirrord_tun.netns.tun import Tun

TABLE_PREFIX = "mirrord_ns_"
TUN_PREFIX = "mrd"
TUNNEL_NET = ipaddress.IPv4Network("100.64.0.0/10")
_COMMENT = re.compile(r"owner=(\S+) fwd=([01])")


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
            fwd_before = _forwarding_before_us()
            nft.run(
                f"table ip {self.table}\ndelete table ip {self.table}\n"
                f"table ip {self.table} {{\n"
                f'  comment "owner={owner.me()} fwd={int(fwd_before)}"\n'
                "  chain postrouting {\n"
                "    type nat hook postrouting priority srcnat; policy accept;\n"
                f'    ip saddr {self.client_addr} oifname != "{self.tun.name}" masquerade\n'
                "  }\n}\n"
            )
            links.write_ip_forward(True)
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


def _ours() -> dict[str, tuple[str, bool]]:
    """Our tables in this namespace: name -> (owner, forwarding before us)."""
    out = {}
    for name, comment in nft.tables("ip", TABLE_PREFIX).items():
        m = _COMMENT.search(comment)
        out[name] = (m[1], m[2] == "1") if m else ("", True)
    return out


def _forwarding_before_us() -> bool:
    existing = _ours()
    if existing:
        return all(fwd for _, fwd in existing.values())
    return links.read_ip_forward()


def _remove_tables(names: list[str]) -> None:
    tables = _ours()
    doomed = [n for n in names if n in tables]
    for name in doomed:
        nft.delete_table("ip", name)
    if doomed and not set(tables) - set(doomed):
        links.write_ip_forward(all(tables[n][1] for n in doomed))


def remove_leftovers() -> list[str]:
    """Remove tables whose owning agent is gone (crash, OOM, SIGKILL); idempotent."""
    dead = [name for name, (who, _) in _ours().items() if not owner.alive(who)]
    _remove_tables(dead)
    return dead
