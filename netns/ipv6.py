"""IPv6 state of the calling thread's network namespace: addresses, prefixes in use, forwarding.

Read from /proc/thread-self/net and /proc/sys/net/ipv6, which show the namespace of the
thread that opens them (so call these through `NetNs.call`, as netns/links.py).

IPv6 forwards a packet when `conf.all.forwarding` or (Linux 6.17 and later) the incoming
device's `force_forwarding` is on; a device's own `forwarding` only makes the kernel a
router on that link: it ignores router advertisements unless accept_ra=2, answers as a
router, joins the all-routers group, ignores redirects. force_forwarding changes nothing
else ("device"); where it is missing, the one switch is conf.all.forwarding ("global"),
which the kernel copies to `default` and every device's `forwarding`. IPv6 devconf has no
rtnetlink setter, so these are /proc/sys writes; where /proc/sys is read-only,
`forwarding_unusable` says so.
"""
from __future__ import annotations

import errno
import ipaddress
import os
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


# `agent --ipv6-forwarding`: auto is device where the kernel has force_forwarding, else global.
FORWARDING_MODES = ("auto", "device", "global", "off")


def forwarding_method(mode: str, has_force_forwarding: bool) -> str | None:
    """How `mode` switches forwarding on, "device" or "global", on a kernel with or without
    force_forwarding; None where it allows neither (the sessions are IPv4 only)."""
    if mode not in FORWARDING_MODES:
        raise ValueError(f"unknown IPv6 forwarding mode {mode!r}")
    if mode == "auto":
        return "device" if has_force_forwarding else "global"
    if mode == "off" or mode == "device" and not has_force_forwarding:
        return None
    return mode


def has_force_forwarding() -> bool:
    return os.path.exists(f"{_CONF}/default/force_forwarding")


def devices() -> list[str]:
    """Every device with IPv6 configuration (lo too), as /proc/sys names them."""
    try:
        return sorted(set(os.listdir(_CONF)) - {"all", "default"})
    except FileNotFoundError:  # a kernel without IPv6
        return []


def get(device: str, knob: str) -> int | None:
    """net.ipv6.conf.DEVICE.KNOB ("all" and "default" too); None where it does not exist
    (a device without IPv6, an MTU below 1280 say, or a kernel without that knob)."""
    try:
        with open(f"{_CONF}/{device}/{knob}") as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def put(device: str, knob: str, value: int) -> None:
    """OSError where the knob is missing or /proc/sys is read-only."""
    with open(f"{_CONF}/{device}/{knob}", "w") as f:
        f.write(str(value))


def forwarding_unusable(method: str) -> str | None:
    """None if forwarding can be switched on by `method` here, else why not."""
    path = f"{_CONF}/default/force_forwarding" if method == "device" else f"{_CONF}/all/forwarding"
    try:
        with open(path, "r+"):  # opening for writing is the check; nothing is written
            return None
    except OSError as e:
        if e.errno == errno.EROFS:  # how container runtimes mount it for unprivileged containers
            return f"{_CONF} is read-only where the agent runs (in Kubernetes: run with --privileged)"
        return f"cannot write {path}: {e.strerror}"
