"""netns/rtnl.py against the kernel, checked with iproute2: what it adds, `ip` shows; what it
removes is gone; errors are OSErrors with the kernel's errno. In a namespace of its own."""
from __future__ import annotations

import errno
import socket
import subprocess

import pytest

from mirrord_tun.netns import rtnl
from mirrord_tun.netns.namespace import NetNs

MARK = 0x6d7274  # a table number past 255: given by attribute only


@pytest.fixture
def ns(private_ns: NetNs) -> NetNs:
    private_ns.call(ip, "tuntap", "add", "mrdtest0", "mode", "tun")
    return private_ns


def ip(*args: str) -> str:
    """`ip ARGS` where the calling thread is: each test's body runs in the namespace (ns.call)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_link_address_and_routes_as_iproute2_shows_them(ns: NetNs) -> None:
    ns.call(_link_address_and_routes_as_iproute2_shows_them)


def _link_address_and_routes_as_iproute2_shows_them() -> None:
    idx = rtnl.index("mrdtest0")
    rtnl.set_up(idx, 1400)
    rtnl.set_up(rtnl.index("lo"))
    assert "mtu 1400" in ip("link", "show", "mrdtest0") and ",UP" in ip("link", "show", "mrdtest0")
    rtnl.add_address(idx, "100.64.0.2", 32)
    rtnl.add_address(rtnl.index("lo"), "198.18.0.10", 32, "lo:mrd")
    rtnl.add_route("0.0.0.0", 0, oif=idx)
    rtnl.add_route("198.18.0.0", 15, oif=idx, proto=77)
    rtnl.add_route("0.0.0.0", 0, oif=rtnl.index("lo"), table=MARK, proto=77, kind=rtnl.RTN_LOCAL)
    rtnl.add_rule(MARK, MARK, 31000)
    assert "inet 100.64.0.2/32" in ip("-4", "addr", "show", "mrdtest0")
    assert "lo:mrd" in ip("-4", "addr", "show", "lo")
    assert "default dev mrdtest0" in ip("route")
    assert "198.18.0.0/15 dev mrdtest0 proto 77" in ip("route")
    assert "local default dev lo proto 77" in ip("route", "show", "table", str(MARK))
    assert f"fwmark {MARK:#x} lookup {MARK}" in ip("rule")

    names = {l.text(rtnl.IFLA_IFNAME) for l in rtnl.links()}
    assert {"lo", "mrdtest0"} <= names
    addrs = {(a.address(rtnl.IFA_LOCAL), a.text(rtnl.IFA_LABEL)) for a in rtnl.addresses(socket.AF_INET)}
    assert ("198.18.0.10", "lo:mrd") in addrs
    assert rtnl.route_to("198.18.0.1").u32(rtnl.RTA_OIF) == idx
    ours = [r for r in rtnl.routes(socket.AF_INET) if r.fields[5] == 77]
    assert {rtnl.table_of(r) for r in ours} == {rtnl.RT_TABLE_MAIN, MARK}
    [rule] = [r for r in rtnl.rules() if r.u32(rtnl.FRA_FWMARK) == MARK]
    assert rtnl.table_of(rule) == MARK and rule.u32(rtnl.FRA_PRIORITY) == 31000

    with pytest.raises(OSError) as e:
        rtnl.add_route("198.18.0.0", 15, oif=idx, proto=77)
    assert e.value.errno == errno.EEXIST
    rtnl.delete_route("198.18.0.0", 15, proto=77)
    rtnl.delete_route("0.0.0.0", 0, table=MARK, proto=77, kind=rtnl.RTN_LOCAL)
    rtnl.delete_rule(MARK, MARK, 31000)
    rtnl.delete_address(rtnl.index("lo"), "198.18.0.10", 32)
    assert "198.18.0.0/15" not in ip("route")
    assert ip("route", "show", "table", str(MARK)) == ""
    assert f"{MARK:#x}" not in ip("rule")
    assert "198.18.0.10" not in ip("addr")
    with pytest.raises(OSError) as e:
        rtnl.delete_route("198.18.0.0", 15, proto=77)
    assert e.value.errno == errno.ESRCH


def test_ipv6_address_without_dad_and_route(ns: NetNs) -> None:
    ns.call(_ipv6_address_without_dad_and_route)


def _ipv6_address_without_dad_and_route() -> None:
    idx = rtnl.index("mrdtest0")
    rtnl.set_up(idx)
    rtnl.add_address(idx, "fd00:64::2", 128)
    rtnl.add_route("::", 0, oif=idx)
    shown = ip("-6", "addr", "show", "mrdtest0")
    assert "fd00:64::2/128" in shown and "tentative" not in shown
    assert "default dev mrdtest0" in ip("-6", "route")


def test_a_missing_link_is_an_oserror(ns: NetNs) -> None:
    ns.call(_a_missing_link_is_an_oserror)


def _a_missing_link_is_an_oserror() -> None:
    with pytest.raises(OSError):
        rtnl.index("nosuchlink")
    with pytest.raises(OSError) as e:
        rtnl.set_up(999_999)
    assert e.value.errno == errno.ENODEV
