"""Which namespace the agent works in, and which resolver configuration the pod sees."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    netns_path: str  # a file whose open fd names the namespace
    resolv_conf: str  # the file a process of the target reads as /etc/resolv.conf


def resolve(netns: str | None, pid: int | None, resolv_conf: str | None) -> Target:
    """Find the target from what the user gave.

    --pid PID: that process's namespace and its root's /etc/resolv.conf (how a
    container's view is reached from the node). --netns /run/netns/NAME: that
    namespace and /etc/netns/NAME/resolv.conf when it exists, which is what
    `ip netns exec NAME` shows a process. Nothing: the agent's own. An explicit
    --resolv-conf wins over all of these.
    """
    if netns and pid:
        raise ValueError("give --netns or --pid, not both")
    if pid:
        path, conf = f"/proc/{pid}/ns/net", f"/proc/{pid}/root/etc/resolv.conf"
    elif netns:
        path, conf = netns, "/etc/resolv.conf"
        named = os.path.join("/etc/netns", os.path.basename(netns), "resolv.conf")
        if os.path.dirname(os.path.abspath(netns)) == "/run/netns" and os.path.exists(named):
            conf = named
    else:
        path, conf = "/proc/self/ns/net", "/etc/resolv.conf"
    if not os.path.exists(path):
        raise ValueError(f"target namespace {path} does not exist")
    return Target(path, resolv_conf or conf)


def read_resolv_conf(target: Target) -> str:
    try:
        with open(target.resolv_conf) as f:
            return f.read()
    except OSError:
        return ""
