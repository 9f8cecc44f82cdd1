"""Which namespace the agent works in, and which resolver configuration the pod sees."""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from mirrord_tun.agent.containers import Process
from mirrord_tun.netns import rootfs

log = logging.getLogger("mirrord-ns.agent")
RESOLV_CONF_MAX = 64 * 1024  # a resolver file is a few lines; more is refused, not sent


@dataclass(frozen=True)
class Target:
    netns_path: str  # a file whose open fd names the namespace
    # The file a process of the target reads as /etc/resolv.conf: `resolv_path` resolved
    # with `resolv_root` as `/` (a container's /proc/PID/root, else this host's own /).
    resolv_root: str
    resolv_path: str
    process: Process | None = None  # --pid: whose root `run --mount` reads files from (agent/files.py)
    label: str = ""  # the namespace as the user named it, for the log


def resolve(netns: str | None, process: Process | None, resolv_conf: str | None) -> Target:
    """Find the target from what the user gave.

    --pid PID: that process's namespace and its root's /etc/resolv.conf (how a
    container's view is reached from the node); the namespace is held open from
    now on, so a restart of the container never moves us into whatever process
    gets its PID next. --netns /run/netns/NAME: that
    namespace and /etc/netns/NAME/resolv.conf when it exists, which is what
    `ip netns exec NAME` shows a process. Nothing: the agent's own. An explicit
    --resolv-conf wins over all of these.
    """
    if netns and process:
        raise ValueError("give --netns or --pid, not both")
    root, conf, label = "/", "/etc/resolv.conf", ""
    if process:
        label, root = process.path("ns/net"), process.path("root")
        fd = os.open(label, os.O_RDONLY)
        try:
            process.confirm()
        except ProcessLookupError as e:
            os.close(fd)  # another process's namespace
            raise ValueError(e.strerror) from None
        path = f"/proc/self/fd/{fd}"  # held from now on; a fork (the guard's worker) has it too
    elif netns:
        path = netns
        named = os.path.join("/etc/netns", os.path.basename(netns), "resolv.conf")
        if os.path.dirname(os.path.abspath(netns)) == "/run/netns" and os.path.exists(named):
            conf = named
    else:
        path = "/proc/self/ns/net"
    if not os.path.exists(path):
        raise ValueError(f"target namespace {path} does not exist")
    if resolv_conf:
        root, conf = "/", os.path.abspath(resolv_conf)
    return Target(path, root, conf, process, label or path)


def read_resolv_conf(target: Target, serve_fs: frozenset[str] = frozenset()) -> str:
    """The target's resolver configuration, or "" (the session still starts). Blocking:
    call it in bounded threads (fileworkers.py); the file is the container's to choose, and a
    container's is read without the file systems that can hang (fsview.py) but `serve_fs`."""
    try:
        if target.process and target.resolv_root == target.process.path("root"):
            data = _read_in_view(target.process, target.resolv_path, serve_fs)
        else:
            data = rootfs.read_regular(target.resolv_root, target.resolv_path, RESOLV_CONF_MAX)
    except FileNotFoundError:
        return ""
    except OSError as e:
        log.warning("not reporting a resolver: %s (in %s)", e, target.resolv_root)
        return ""
    return data.decode("utf-8", "replace")


def _read_in_view(process: Process, path: str, serve_fs: frozenset[str]) -> bytes:
    from mirrord_tun.agent import fsview

    view = fsview.open_view(process, serve_fs)
    try:
        if view.refusal(path):
            raise PermissionError(errno.EACCES, view.refusal(path))
        fd = rootfs.open_regular(view.root, path, os.O_RDONLY)
    finally:
        view.close()
    try:
        return rootfs.read_capped(fd, RESOLV_CONF_MAX, path)
    finally:
        os.close(fd)
