"""An agent whose /proc/sys is read-only, as in an unprivileged container.

Container runtimes mount /proc/sys read-only unless a pod is privileged, so the agent
cannot write net.ipv4.ip_forward there; it must fall back to per-device forwarding over
rtnetlink and still undo all of it.
"""
from __future__ import annotations

from typing import Iterator

import pytest
from conftest import POD, SVC, Cluster, assert_clean, make_cluster, mrd_run, read_line, start_run

from mirrord_tun.sandbox import Sandbox

# A private mount namespace for the agent in which /proc/sys is a read-only bind mount.
READ_ONLY_PROC_SYS = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount -o bind,ro /proc/sys /proc/sys && exec "$@"', "agent")


@pytest.fixture
def confined() -> Iterator[Cluster]:
    yield from make_cluster(agent_wrap=READ_ONLY_PROC_SYS)


def pod_knob(sb: Sandbox, knob: str) -> str:
    return sb.exec("pod", "cat", f"/proc/sys/net/ipv4/{knob}").stdout.strip()


def test_read_only_proc_sys_forwards_per_device_and_restores(confined: Cluster) -> None:
    sb = confined.sb
    run = start_run(sb, "sh", "-c", f"curl -sS -m 10 http://{SVC}/ && sleep 30")
    assert f"you are {POD}" in read_line(run)
    # The sysctl stayed as it was; the links replies arrive on forward instead.
    assert pod_knob(sb, "ip_forward") == "0"
    assert pod_knob(sb, "conf/eth0/forwarding") == "1"
    sb.stop(run)
    assert_clean(sb)


def test_read_only_proc_sys_serves_two_sessions(confined: Cluster) -> None:
    sb = confined.sb
    first = start_run(sb, "sh", "-c", "echo up; sleep 30")
    assert read_line(first) == "up\n"
    second = mrd_run(sb, "curl", "-sS", "-m", "10", f"http://{SVC}/")
    assert f"you are {POD}" in second.stdout, second.stderr
    # The second session's end must not switch forwarding off under the first.
    assert pod_knob(sb, "conf/eth0/forwarding") == "1"
    sb.stop(first)
    assert_clean(sb)
