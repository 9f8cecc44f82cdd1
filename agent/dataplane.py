"""What one session puts into the target's namespace, and how it is all taken out.

Per session: a TUN `mrd<sid>` carrying a /30 from 100.64.0.0/10 (agent .1, client
.2), and an nft table `mirrord_ns_<sid>` that masquerades the client address as
the pod and keeps the pod from becoming a router into the laptop: only
connections the client opens leave its TUN, only their replies enter it, and
the agent-side address answers the client alone.

Forwarding is switched on per device over rtnetlink, never with
net.ipv4.ip_forward: IPv4 forwards by the flag of the device a packet comes in
on, so the TUN (the client's packets) and the links replies come in on are
enough, and writing ip_forward would also rewrite every device's flag and
net.ipv4.conf.all.accept_redirects. The links switched on forwarded nothing
before, and the forward chain keeps it so for all but our replies.

The table's comment records the owning agent process and what forwarding was
before any session touched it (the links that had it off), so that whoever
removes the last table (the session, the agent's guard, or the next agent
start) puts exactly that back. Tables of older agents, which set ip_forward
themselves, are read and restored too. The TUN needs no cleanup: it vanishes
with the fd. Every function runs in the target namespace's thread.

IPv6, when the pod has a global or unique-local address: the session's TUN also
carries a pair from TUNNEL_NET6 (the IPv4 pair's addresses in its last 32 bits),
and a second table of the same name in the `ip6` family does for IPv6 what the
`ip` table does for IPv4 (masquerade, forward/input/output filters, steal).
IPv6 forwarding (netns/ipv6.py, `agent --ipv6-forwarding`) is switched on per
device with `force_forwarding` where the kernel has it (Linux 6.17), else with
net.ipv6.conf.all.forwarding, which also switches every device's `forwarding`
(the pod becomes a router on its links; `default` is put back at once, so links
that appear meanwhile are not): accept_ra 1 is raised to 2 first wherever it is
in force, so router advertisements keep the pod's addresses and routes. Either
way what it overwrote is recorded in that table's comment and restored the same
way, and the forward chain drops whatever the switch would newly forward other
than our replies (with the global switch: between any two links not our TUNs).
Where neither is possible (or wanted), or /proc/sys is read-only, the session is
IPv4 only.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
from typing import Callable, NamedTuple

from mirrord_tun.agent import owner
from mirrord_tun.agent.steal import proxy as steal_proxy, rules as steal_rules
from mirrord_tun.netns import ipv6, links, nft
from mirrord_tun.netns.exec import COMMAND_PORTS
from mirrord_tun.netns.tun import Tun

log = logging.getLogger("mirrord-ns.agent")
TABLE_PREFIX = "mirrord_ns_"
TUN_PREFIX = "mrd"
TUNNEL_NET = ipaddress.IPv4Network("100.64.0.0/10")
# The client's TCP and UDP leave from these ports of the pod's, which `run` also takes its own
# from (kept as they are where free); the pod's own use the ports below (netns/exec.py).
_PORTS = "%d-%d" % COMMAND_PORTS
# A unique-local prefix of ours (RFC 4193: fd + a 40-bit global ID, here "mrdns" in ASCII),
# with the session's IPv4 tunnel address in the last 32 bits: the pair is as unique as the
# IPv4 /30 it comes from. A pod's own ULA prefix carries the random global ID its network
# chose, so meeting this /96 there is a 2^-40 chance, and it is checked like the /30:
# a namespace that has it as an address or route gets IPv4-only sessions.
TUNNEL_NET6 = ipaddress.IPv6Network("fd6d:7264:6e73::/96")
# Session tables only: the mirror's and attach's tables (mirrord_ns_mirror, ...) are not a session's.
_SESSION_TABLE = re.compile(re.escape(TABLE_PREFIX) + r"[0-9a-f]+")
# `ip_forward=untouched` marks tables of agents that never write the sysctl; older ones
# wrote it whenever `fwd=0`, and the last of their tables to go must write it back.
_COMMENT = re.compile(r"owner=(\S+) fwd=([01])(?: dev=(\S*))?( ip_forward=untouched)?")
_COMMENT6 = re.compile(r"owner=(\S+) force_forwarding_on=(\S*)(?: global=([01]) fwd=(\S*) ra=(\S*))?")
# Link names are the namespace's, so chosen by whoever has NET_ADMIN there: only plain
# ones go into an nft script or a comment (a name may hold quotes or braces).
_PLAIN_LINK = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# This process's open sessions and their records, by table: still there if someone deleted the tables.
_open: dict[str, _Record] = {}
_open6: dict[str, _Record6] = {}


class SessionPlane:
    """The kernel state of one session; `close()` removes all of it."""

    def __init__(self, sid: str, ipv6_forwarding: str = "auto") -> None:
        """`ipv6_forwarding`: one of netns.ipv6.FORWARDING_MODES."""
        if not _SESSION_TABLE.fullmatch(TABLE_PREFIX + sid):
            raise ValueError(f"bad session id {sid!r}")
        self.sid = sid
        self.table = TABLE_PREFIX + sid
        self.tun: Tun | None = None
        self.agent_addr = self.client_addr = ""
        self.agent_addr6 = self.client_addr6 = ""  # "" while the session is IPv4 only
        self.mtu = 1500
        self.pod_addrs: list[str] = []
        self.pod_addrs6: list[str] = []
        self.ipv6_forwarding = ipv6_forwarding
        self.ipv6_off = ""  # why a pod with IPv6 gets an IPv4-only session
        # What the tables record, kept here as well: a container with NET_ADMIN may delete
        # the tables, and forwarding must still go back when the session ends.
        self.record: _Record | None = None
        self.record6: _Record6 | None = None

    @property
    def client_addrs(self) -> list[str]:
        return [a for a in (self.client_addr, self.client_addr6) if a]

    def open(self) -> None:
        self.pod_addrs = links.ipv4_addresses(exclude_prefix=TUN_PREFIX)
        block = _free_block(self.pod_addrs)
        self.agent_addr, self.client_addr = str(block[1]), str(block[2])
        self.mtu = links.uplink_mtu()
        self.pod_addrs6 = ipv6.global_addresses(exclude_prefix=TUN_PREFIX)
        method = ""
        if self.pod_addrs6:
            method, no_ipv6 = _ipv6_method(self.ipv6_forwarding, self.mtu)
            if no_ipv6:
                log.info("session %s is IPv4 only: %s", self.sid, no_ipv6)
                self.pod_addrs6, self.ipv6_off = [], no_ipv6
            else:
                self.agent_addr6, self.client_addr6 = (str(TUNNEL_NET6[int(a)]) for a in (block[1], block[2]))
        own = [a for a in (self.agent_addr, self.agent_addr6) if a]
        try:
            if self.client_addr6:
                self.record6 = _open6[self.table] = record6 = _forwarding6_before_us(method)
                nft.run(_ruleset6(self.table, TUN_PREFIX + self.sid, self.agent_addr6, self.client_addr6, record6,
                                  self.pod_addrs6))
                # Before the TUN exists: a link that has `forwarding` while the global switch
                # is written joins the all-routers groups, which MLD would announce to the client.
                if record6.global6 and not ipv6.get("all", "forwarding"):
                    _switch_global_on(record6.global6)
            self.tun = Tun(TUN_PREFIX + self.sid)
            links.bring_up_tun(self.tun.name, own, self.mtu, peers=self.client_addrs)
            self.record = _open[self.table] = record = _forwarding_before_us()
            nft.run(_ruleset(self.table, self.tun.name, block, record, self.pod_addrs))
            present = set(links.links_except(TUN_PREFIX))
            for name in [self.tun.name, *(d for d in record.links_off if d in present)]:
                links.set_device_forwarding(name, True)
            if self.record6 and method == "device":
                for name in [self.tun.name, *(d for d in self.record6.links_off if d in present)]:
                    ipv6.put(name, "force_forwarding", 1)
        except BaseException:
            self.close()
            raise

    def close(self, stole: bool = False) -> None:
        """`stole`: the session stole connections, to be reset once the table stops making more."""
        if self.record:
            _open.pop(self.table, None)
            _remove_tables({self.table: self.record})
            self.record = None
        if self.record6:
            _open6.pop(self.table, None)
            _remove_tables6({self.table: self.record6})
            self.record6 = None
        if stole and self.client_addr:
            clients = {ipaddress.ip_address(a) for a in self.client_addrs}
            _reset_stolen(lambda addr: addr in clients)
        if self.tun:
            self.tun.close()
            self.tun = None


def _ruleset(table: str, tun: str, block: ipaddress.IPv4Network, record: _Record, pod_addrs: list[str]) -> str:
    """The session's table; every name and address in it is ours or checked (_plain_links,
    the pod's addresses from rtnetlink)."""
    agent, client = block[1], block[2]
    switched_on = ", ".join(f'"{name}"' for name in record.links_off)
    return (
        # No `delete table` first (it costs ~15 ms): the name is the session's own, and a bare
        # `table` line would create it without its comment, which records what to restore.
        f"table ip {table} {{\n"
        f'  comment "{record.comment()}"\n'
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {client} oifname != "{tun}" meta l4proto {{ tcp, udp }} masquerade to :{_PORTS}\n'
        f'    ip saddr {client} oifname != "{tun}" masquerade\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{tun}" ip saddr != {client} drop\n'
        f'    iifname "{tun}" oifname "{TUN_PREFIX}*" drop\n'  # never from one session into another
        f'    oifname "{tun}" ct state established,related accept\n'
        + steal_rules.forward_rules(tun, str(client))
        + f'    oifname "{tun}" drop\n'
        # Links that forwarded nothing before us forward only our replies (above) now.
        + (f'    iifname {{ {switched_on} }} oifname != "{TUN_PREFIX}*" drop\n' if switched_on else "")
        + "  }\n"
        + steal_rules.declarations(f"{TUN_PREFIX}*", str(client), pod_addrs)
        + "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    ip daddr {agent} iifname != "{tun}" drop\n'
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        + steal_rules.output_rules(tun, str(client))
        # The pod's own processes answer the client (established, ICMP errors), never call it.
        + f'    oifname "{tun}" ct state new drop\n'
        "  }\n}\n"
    )


def _ruleset6(table: str, tun: str, agent: str, client: str, record: _Record6, pod_addrs: list[str]) -> str:
    """The IPv4 table's rules for IPv6 (`pod_addrs`: the pod's IPv6 ones). ICMPv6 errors about the
    client's connections (Packet Too Big, unreachable, time exceeded) are `related` and pass."""
    switched_on = ", ".join(f'"{name}"' for name in record.links_off)
    if record.global6:  # every link forwards now, also one that appears later
        dropped = f'    iifname != "{TUN_PREFIX}*" oifname != "{TUN_PREFIX}*" drop\n'
    else:
        dropped = f'    iifname {{ {switched_on} }} oifname != "{TUN_PREFIX}*" drop\n' if switched_on else ""
    return (
        f"table ip6 {table} {{\n"
        f'  comment "{record.comment()}"\n'
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip6 saddr {client} oifname != "{tun}" meta l4proto {{ tcp, udp }} masquerade to :{_PORTS}\n'
        f'    ip6 saddr {client} oifname != "{tun}" masquerade\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{tun}" ip6 saddr != {client} drop\n'
        f'    iifname "{tun}" oifname "{TUN_PREFIX}*" drop\n'
        f'    oifname "{tun}" ct state established,related accept\n'
        + steal_rules.forward_rules(tun, client, "ip6")
        + f'    oifname "{tun}" drop\n'
        + dropped
        + "  }\n"
        + steal_rules.declarations(f"{TUN_PREFIX}*", client, pod_addrs, "ip6")
        + "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    ip6 daddr {agent} iifname != "{tun}" drop\n'
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        + steal_rules.output_rules(tun, client, "ip6")
        + f'    oifname "{tun}" ct state new drop\n'
        "  }\n}\n"
    )


def _ipv6_method(mode: str, mtu: int) -> tuple[str, str]:
    """("device" or "global", "") if this session can carry IPv6 (the pod has an IPv6 address),
    else ("", why not); `mode` is the agent's --ipv6-forwarding."""
    if mtu < 1280:
        return "", f"the pod's MTU {mtu} is below IPv6's 1280"
    if any(n.overlaps(TUNNEL_NET6) for n in ipv6.in_use(exclude_prefix=TUN_PREFIX) if n.prefixlen > 0):
        return "", f"the pod's network already uses {TUNNEL_NET6}"
    method = ipv6.forwarding_method(mode, ipv6.has_force_forwarding())
    if method is None:
        if mode == "off":
            return "", "the agent runs with --ipv6-forwarding off"
        return "", ("this kernel has no per-device IPv6 forwarding (net.ipv6.conf.*.force_forwarding, "
                    "Linux 6.17) and the agent runs with --ipv6-forwarding device")
    unusable = ipv6.forwarding_unusable(method)
    return ("", unusable) if unusable else (method, "")


# A cluster may number its pods from 100.64.0.0/10 as well (EKS custom networking: /16 VPC
# blocks; GKE: a /14 by default). A pod reaches the others through its default route, so its
# namespace shows only its own address: a /30 of ours next to it could be another pod's address,
# and the pod's traffic to that pod would meet our TUN. So the /14 around each address the pod
# has in the range is avoided too, while that leaves room (1/16 of the range per address).
CLUSTER_GUESS = 14


def _free_block(pod_addrs: list[str]) -> ipaddress.IPv4Network:
    """A random /30 of TUNNEL_NET clear of the namespace's addresses and routes (`pod_addrs`: its
    own addresses, our TUNs' left out)."""
    used = [u for u in links.ipv4_in_use() if u.prefixlen > 0]
    near = [ipaddress.IPv4Network(f"{a}/{CLUSTER_GUESS}", strict=False)
            for a in pod_addrs if ipaddress.ip_address(a) in TUNNEL_NET]
    for avoid in (used + near, used):
        for _ in range(64):
            n = random.randrange(TUNNEL_NET.num_addresses // 4)
            block = ipaddress.IPv4Network((int(TUNNEL_NET.network_address) + 4 * n, 30))
            if not any(block.overlaps(u) for u in avoid):
                return block
    raise RuntimeError("no free /30 left in 100.64.0.0/10 in the target namespace")


class _Record(NamedTuple):
    owner: str
    ip_forward: bool  # net.ipv4.ip_forward before the first session
    links_off: list[str]  # links whose forwarding was off before the first session
    writes_ip_forward: bool  # an older agent turned ip_forward on: the last table out turns it off

    def comment(self) -> str:
        untouched = "" if self.writes_ip_forward else " ip_forward=untouched"
        return f"owner={self.owner} fwd={int(self.ip_forward)} dev={','.join(self.links_off)}{untouched}"


class _Global6(NamedTuple):
    """What writing net.ipv6.conf.all.forwarding=1 overwrote (it was 0)."""
    default_forwarding: bool  # net.ipv6.conf.default.forwarding before
    forwarding_on: list[str]  # links whose own forwarding was 1 before (writing all=0 resets them)
    accept_ra: list[str]  # links whose accept_ra we raised from 1 to 2


class _Record6(NamedTuple):
    owner: str
    links_off: list[str]  # links whose IPv6 force_forwarding was off before the first IPv6 session
    global6: _Global6 | None  # set when a session switched conf.all.forwarding on

    def comment(self) -> str:
        # Short keys: nft keeps 128 characters of a comment.
        text = f"owner={self.owner} force_forwarding_on={','.join(self.links_off)}"
        if g := self.global6:
            text += f" global={int(g.default_forwarding)} fwd={','.join(g.forwarding_on)} ra={','.join(g.accept_ra)}"
        return text


def _plain_links(names: list[str]) -> list[str]:
    plain = [n for n in names if _PLAIN_LINK.fullmatch(n)]
    if len(plain) < len(names):
        log.warning("not forwarding on links with unusual names: %s", sorted(set(names) - set(plain)))
    return plain


def _ours() -> dict[str, _Record]:
    """Our tables in this namespace and what their comments record."""
    out = {}
    for name, comment in nft.tables("ip", TABLE_PREFIX).items():
        if not _SESSION_TABLE.fullmatch(name):
            continue
        m = _COMMENT.search(comment)
        # Without a record, assume forwarding was on: never switch off what we cannot prove we switched on.
        out[name] = _Record(m[1], m[2] == "1", _split_links(m[3] or ""),
                            m[2] == "0" and not m[4]) if m else _Record("", True, [], False)
    return out


def _forwarding_before_us() -> _Record:
    existing = list({**_open, **_ours()}.values())
    if existing:  # the first session's record, carried on by every later one
        links_off = sorted({d for r in existing for d in r.links_off})
        return _Record(owner.me(), all(r.ip_forward for r in existing), links_off,
                       any(r.writes_ip_forward for r in existing))
    off = [d for d in _plain_links(links.links_except(TUN_PREFIX)) if not links.device_forwarding(d)]
    return _Record(owner.me(), links.read_ip_forward(), off, False)


def _ours6() -> dict[str, _Record6]:
    out = {}
    for name, comment in nft.tables("ip6", TABLE_PREFIX).items():
        if not _SESSION_TABLE.fullmatch(name):
            continue
        m = _COMMENT6.search(comment)
        if not m:  # without a record, switch nothing off: we cannot prove we switched it on
            out[name] = _Record6("", [], None)
            continue
        global6 = _Global6(m[3] == "1", _split_links(m[4]), _split_links(m[5])) if m[3] else None
        out[name] = _Record6(m[1], _split_links(m[2]), global6)
    return out


def _split_links(text: str) -> list[str]:
    return _plain_links([d for d in text.split(",") if d])


def _forwarding6_before_us(method: str) -> _Record6:
    """The record of the first IPv6 session, carried on by every later one; a session switching
    forwarding on by `method` in a way no earlier one did adds what that overwrites."""
    existing = list({**_open6, **_ours6()}.values())
    if existing:
        links_off = sorted({d for r in existing for d in r.links_off})
        global6 = next((r.global6 for r in existing if r.global6), None)
    else:
        links_off, global6 = [], None
        # A router already (all.forwarding=1) forwards on every link: nothing to switch on.
        if method == "device" and not ipv6.get("all", "forwarding"):
            links_off = [d for d in _plain_links(links.links_except(TUN_PREFIX)) if ipv6.get(d, "force_forwarding") == 0]
    if method == "global" and not global6 and not ipv6.get("all", "forwarding"):
        global6 = _global6_before_us()
    return _Record6(owner.me(), links_off, global6)


def _global6_before_us() -> _Global6:
    names = _plain_links([d for d in ipv6.devices() if not d.startswith(TUN_PREFIX)])
    forwarding = {d: ipv6.get(d, "forwarding") for d in names}
    # accept_ra=1 is in force only where forwarding is off; with forwarding on, 2 keeps it so.
    raise_ra = [d for d in names if forwarding[d] == 0 and ipv6.get(d, "accept_ra") == 1]
    return _Global6(ipv6.get("default", "forwarding") == 1, [d for d in names if forwarding[d] == 1], raise_ra)


def _switch_global_on(g: _Global6) -> None:
    # accept_ra first: switching forwarding on also purges the routes learned from router
    # advertisements on every link whose accept_ra is not 2.
    for name in g.accept_ra:
        ipv6.put(name, "accept_ra", 2)
    ipv6.put("all", "forwarding", 1)
    # The kernel copied it to default: links that appear now (our TUNs, a new veth) would be
    # routers on their link. Forwarding itself needs all.forwarding alone.
    if not g.default_forwarding:
        ipv6.put("default", "forwarding", 0)


def _restore_global(g: _Global6) -> None:
    ipv6.put("all", "forwarding", 0)  # and, by the kernel, default's and every link's
    if g.default_forwarding:
        ipv6.put("default", "forwarding", 1)
    for name, knob, value in [*((d, "forwarding", 1) for d in g.forwarding_on),
                              *((d, "accept_ra", 1) for d in g.accept_ra)]:
        with contextlib.suppress(FileNotFoundError):  # the link is gone or lost IPv6: nothing to undo
            ipv6.put(name, knob, value)


def _remove_tables6(doomed: dict[str, _Record6]) -> None:
    """Delete `doomed` ip6 tables; with the last of them, put back the forwarding they switched on."""
    others = (set(_ours6()) | set(_open6)) - set(doomed)
    for name in doomed:
        nft.delete_table("ip6", name)
    if doomed and not others:
        global6 = next((r.global6 for r in doomed.values() if r.global6), None)
        if global6:
            _restore_global(global6)
        present = set(links.links_except(TUN_PREFIX))
        for name in sorted({d for r in doomed.values() for d in r.links_off} & present):
            with contextlib.suppress(FileNotFoundError):  # the link lost IPv6 meanwhile: nothing to undo
                ipv6.put(name, "force_forwarding", 0)


def _remove_tables(doomed: dict[str, _Record]) -> None:
    """Delete `doomed` tables; with the last of ours, put forwarding back as they record."""
    others = (set(_ours()) | set(_open)) - set(doomed)
    for name in doomed:
        nft.delete_table("ip", name)
    if doomed and not others:
        if any(r.writes_ip_forward for r in doomed.values()):
            # An older agent's write of 1 set conf.all.accept_redirects to 0; writing 0
            # sets it back to 1, the kernel's default, which is all that can be known of before.
            with contextlib.suppress(OSError):
                links.write_ip_forward(False)
        present = set(links.links_except(TUN_PREFIX))
        for name in sorted({d for r in doomed.values() for d in r.links_off} & present):
            links.set_device_forwarding(name, False)


def remove_leftovers() -> list[str]:
    """Remove tables whose owning agent is gone (crash, OOM, SIGKILL); idempotent."""
    dead = {name: record for name, record in _ours().items() if not owner.alive(record.owner)}
    _remove_tables(dead)
    dead6 = {name: record for name, record in _ours6().items() if not owner.alive(record.owner)}
    _remove_tables6(dead6)
    if not _ours() and not _open:
        steal_proxy.remove_routing()  # a filtered steal's, which only a live agent's sessions use
    if dead:
        # Their TUNs went with the dead process; a live session's TUN holds the agent end
        # (.1) of its /30, whose client (.2) still owns its stolen connections (an IPv6 client's
        # address carries the IPv4 one in its last 32 bits).
        live = {ipaddress.IPv4Address(a) + 1 for a in links.ipv4_addresses_on(TUN_PREFIX)}

        def dead_client(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
            if addr in TUNNEL_NET6:
                addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
            return addr in TUNNEL_NET and addr not in live

        _reset_stolen(dead_client)
    return [*dead, *(f"ip6 {name}" for name in dead6)]


def _reset_stolen(stolen_by: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]) -> None:
    try:
        n = steal_rules.reset_stolen(stolen_by)
    except Exception as e:  # noqa: BLE001 - no conntrack netlink here: the connections time out instead
        log.warning("cannot reset stolen connections: %s", e)
        return
    if n:
        log.info("reset %d stolen connection(s)", n)
