"""IPv6 state of the calling thread's network namespace: addresses, prefixes in use, forwarding.

Read from /proc/thread-self/net and /proc/sys/net/ipv6, which show the namespace of the
thread that opens them (so call these through `NetNs.call`, as netns/links.py).

Forwarding is switched on per device with `force_forwarding` (Linux 6.17): IPv6 forwards
a packet when `conf.all.forwarding` or the incoming device's `force_forwarding` is on, and
force_forwarding changes nothing else, unlike `forwarding`, which also makes the kernel a
router on that link (it ignores router advertisements unless accept_ra=2, answers as a
router, joins the all-routers group). IPv6 devconf has no rtnetlink setter, so these are
/proc/sys writes; where /proc/sys is read-only, `force_forwarding_usable` says no.
"""
from __future__ import annotations

import errno
import ipaddress
from typing import NamedTuple

_NET = "/proc/thread-self/net"
_CONF = "/proc/sys/net/ipv6/conf"
# /proc/net/if_inet6: scope values (RT_SCOPE_*) and address flags (IFA_F_*).
_SCOPE_GLOBAL = 0x00
_IFA_F_DADFAILED, _IFA_F_TENTATIVE = 0x08, 0x40


class Address(NamedTuple):
    addr: ipaddress.IPv6Address
    prefixlen: int
    scope: int
    flags: int
    device: str


def addresses() -> list[Address]:
    """Every IPv6 address of the namespace (none when IPv6 is off)."""
    try:
        with open(f"{_NET}/if_inet6") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:  # a kernel without IPv6
        return []
    out = []
    for line in lines:
        hexaddr, _index, plen, scope, flags, device = line.split()
        out.append(Address(ipaddress.IPv6Address(int(hexaddr, 16)), int(plen, 16), int(scope, 16),
                           int(flags, 16), device))
    return out


def global_addresses(exclude_prefix: str) -> list[str]:
    """Global and unique-local addresses (what peers reach the namespace at) that are usable
    now, skipping lo and devices whose name starts with `exclude_prefix` (our TUNs)."""
    return [str(a.addr) for a in addresses()
            if a.scope == _SCOPE_GLOBAL and not a.flags & (_IFA_F_DADFAILED | _IFA_F_TENTATIVE)
            and a.device != "lo" and not a.device.startswith(exclude_prefix)]


def in_use(exclude_prefix: str) -> list[ipaddress.IPv6Network]:
    """Every IPv6 prefix the namespace has as an address or a route (any table), except those
    of devices whose name starts with `exclude_prefix` (our TUNs)."""
    nets = [ipaddress.IPv6Network((a.addr, a.prefixlen), strict=False) for a in addresses()
            if not a.device.startswith(exclude_prefix)]
    try:
        with open(f"{_NET}/ipv6_route") as f:
            for line in f:
                fields = line.split()  # dst, dst len, src, src len, next hop, metric, ..., device
                if not fields[-1].startswith(exclude_prefix):
                    nets.append(ipaddress.IPv6Network((int(fields[0], 16), int(fields[1], 16))))
    except FileNotFoundError:
        pass
    return nets


def enabled(device: str = "lo") -> bool:
    """Whether `device` has IPv6 (containers often start with it disabled everywhere)."""
    try:
        with open(f"{_CONF}/{device}/disable_ipv6") as f:
            return f.read().strip() == "0"
    except FileNotFoundError:  # a kernel without IPv6
        return False


def forwarding_all() -> bool:
    with open(f"{_CONF}/all/forwarding") as f:
        return f.read().strip() == "1"


def force_forwarding(device: str) -> bool | None:
    """None for a device without IPv6 (an MTU below 1280, say): nothing to forward there."""
    try:
        with open(f"{_CONF}/{device}/force_forwarding") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return None


def set_force_forwarding(device: str, on: bool) -> None:
    """OSError where the knob is missing (before Linux 6.17) or /proc/sys is read-only."""
    with open(f"{_CONF}/{device}/force_forwarding", "w") as f:
        f.write("1" if on else "0")


def force_forwarding_usable() -> str | None:
    """None if per-device IPv6 forwarding can be switched here, else why not."""
    path = f"{_CONF}/default/force_forwarding"
    try:
        with open(path, "r+"):  # opening for writing is the check; nothing is written
            return None
    except FileNotFoundError:
        return "this kernel has no per-device IPv6 forwarding (net.ipv6.conf.*.force_forwarding, Linux 6.17)"
    except OSError as e:
        if e.errno == errno.EROFS:  # how container runtimes mount it for unprivileged containers
            return f"{_CONF} is read-only where the agent runs (in Kubernetes: run with --privileged)"
        return f"cannot write {path}: {e.strerror}"
