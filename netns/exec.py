"""Start the user's command inside a namespace, as the user who invoked sudo.

The child joins the network namespace, gets a private mount namespace in which
/etc/resolv.conf is the pod's, drops to the invoking user, and asks the kernel
to SIGTERM it if its parent (`run`) dies without cleaning up.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass

from mirrord_tun.netns.namespace import CLONE_NEWNET, CLONE_NEWNS, mount, setns, unshare

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: list[int]
    name: str
    home: str


def invoking_user() -> User | None:
    """The user behind sudo (SUDO_UID/SUDO_GID), or None to keep running as we are."""
    uid = os.environ.get("SUDO_UID")
    if not uid or os.geteuid() != 0 or int(uid) == 0:
        return None
    uid_i = int(uid)
    try:
        pw = pwd.getpwuid(uid_i)
        name, home, gid = pw.pw_name, pw.pw_dir, int(os.environ.get("SUDO_GID", pw.pw_gid))
        groups = os.getgrouplist(name, gid)
    except KeyError:
        name, home, gid = os.environ.get("SUDO_USER", str(uid_i)), "/", int(os.environ.get("SUDO_GID", uid_i))
        groups = [gid]
    return User(uid_i, gid, groups, name, home)


def spawn(argv: list[str], netns_fd: int, resolv_conf: str | None, user: User | None,
          extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start argv in the namespace; raises FileNotFoundError/PermissionError like Popen."""
    env = dict(os.environ, **(extra_env or {}))
    if user:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)

    parent = os.getpid()

    def enter() -> None:  # runs in the child between fork and exec
        setns(netns_fd, CLONE_NEWNET)
        if resolv_conf:
            unshare(CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount(resolv_conf, "/etc/resolv.conf", None, MS_BIND)
        if user:
            os.setgroups(user.groups)
            os.setgid(user.gid)
            os.setuid(user.uid)
        # Set after the uid change, which would clear it.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # died before we asked
            os._exit(1)

    return subprocess.Popen(argv, env=env, preexec_fn=enter, close_fds=True)
