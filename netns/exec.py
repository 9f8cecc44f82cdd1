"""Start the user's command inside a namespace, as the user who invoked sudo.

The child joins the network namespace, gets a private mount namespace in which
/etc/resolv.conf is the pod's, drops to the invoking user, and asks the kernel
to SIGTERM it if its parent (`run`) dies without cleaning up.

Privileges are dropped by Popen itself (`user=`, `group=`, `extra_groups=`), in C
between fork and exec. CPython does that *before* it calls `preexec_fn`, so the
steps that need root cannot happen in the child: the calling thread enters the
namespaces, forks, and goes back. setns/unshare bind only the calling thread,
so the rest of the process never sees them.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from mirrord_tun.netns.namespace import CLONE_NEWNET, CLONE_NEWNS, mount, setns, unshare

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
# Every group may open ICMP echo sockets (what systemd sets on the host): the
# namespace holds only the user's command, and without it `ping` as the user fails
# with "permission denied" (a fresh namespace starts at "1 0", nobody).
PING_GROUP_RANGE = "0 2147483647"
# The command's source ports, which the agent masquerades its connections into too: above the
# kernel's default range (32768-60999), which the pod's own connections use. A connection of the
# command's and a later one of the pod's on the same port to the same server (or the other way
# round) carry unrelated TCP timestamps: a server that closed the first and holds it in TIME_WAIT
# refuses the second's SYN as old (PAWS), and that client resets and tries again (the pod's own
# new connections to such a server took up to 3.5x as long for a minute after a session). 4,536
# ports allow that many connections open at once to one server (the default range 28,232); the
# command reuses its own TIME_WAIT ports after a second (their timestamps tell the connections
# apart), so they set no limit on new ones a second. docs/usage.md, "Outbound".
COMMAND_PORTS = (61000, 65535)
_SYSCTLS = {"/proc/sys/net/ipv4/ping_group_range": PING_GROUP_RANGE,
            "/proc/sys/net/ipv4/ip_local_port_range": "%d %d" % COMMAND_PORTS,
            "/proc/sys/net/ipv4/tcp_tw_reuse": "1",
            # Timestamps from this machine's clock as it is (2), not offset per address pair (1):
            # each session has another tunnel address, so with offsets a session's connections
            # met the previous session's in the servers' TIME_WAIT as older, and were refused as
            # above (a session right after one that made 3,000 connections to a server took 30-65
            # s for its own 3,000 instead of 11-14). The clock says how long this machine has been up.
            "/proc/sys/net/ipv4/tcp_timestamps": "2"}
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


class ExtraMounts(Protocol):
    """`run --mount` (mirrord_tun/mounts.py): mounts made in the command's namespace before it starts."""

    paths: list[str]

    def mount_here(self) -> None: ...


def spawn(argv: list[str], netns_fd: int, resolv_conf: str | None, user: User | None,
          extra_env: dict[str, str] | None = None, mounts: ExtraMounts | None = None) -> subprocess.Popen[bytes]:
    """Start argv in the namespace (a fresh one of ours: its ping range is opened up, its ports
    are its own: _SYSCTLS).

    `mounts.mount_here` runs in this thread inside the command's private mount namespace
    (made for it even without resolv_conf), before the command starts.
    Raises FileNotFoundError/PermissionError like Popen, SubprocessError when the
    namespace cannot be entered or the mounts fail.
    """
    env = dict(os.environ, **(extra_env or {}))
    executable = _executable(argv[0], env.get("PATH"), mounts.paths) if mounts else None
    drop: dict[str, object] = {}
    if user:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        drop = dict(user=user.uid, group=user.gid, extra_groups=user.groups)

    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, after Popen changed the uid (which clears it)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # died before we asked
            os._exit(1)

    # The fork happens in this thread, so PDEATHSIG follows this thread's life; run calls
    # spawn from its main thread.
    with _inside(netns_fd, resolv_conf, mounts.mount_here if mounts else None):
        return subprocess.Popen(argv, executable=executable, env=env, preexec_fn=die_with_parent,
                                close_fds=True, **drop)  # type: ignore[call-overload]


def _executable(name: str, search: str | None, mounted: list[str]) -> str:
    """argv[0] found before the mounts exist, never under one. Popen waits in this thread until
    exec has found the file; a walk through a FUSE mount would wait for sshfs, whose SFTP goes
    through `run`'s event loop: this very thread."""
    found = name if "/" in name else shutil.which(name, path=search)
    if not found:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    real = os.path.realpath(found)
    for path in mounted:
        if real == path or real.startswith(path + "/"):
            raise subprocess.SubprocessError(f"{name} is under --mount {path}, which is mounted noexec")
    return found


@contextlib.contextmanager
def _inside(netns_fd: int, resolv_conf: str | None, mount_more: Callable[[], None] | None) -> Iterator[None]:
    """This thread in the namespace (and, with resolv_conf or mount_more, a private mount namespace); back after."""
    own_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    own_mnt = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    left_mnt = False
    try:
        try:
            setns(netns_fd, CLONE_NEWNET)
            for path, value in _SYSCTLS.items():
                with open(path, "w") as f:
                    f.write(value)
            if resolv_conf or mount_more:
                # Implies CLONE_FS: this thread alone gets its own root, cwd and mounts (and
                # keeps its own cwd and umask from now on, which `run` never changes).
                unshare(CLONE_NEWNS)
                left_mnt = True
                mount(None, "/", None, MS_REC | MS_PRIVATE)
            if mount_more:  # first: it may shadow /etc, which the resolver's bind mount then covers
                mount_more()
            if resolv_conf:
                mount(resolv_conf, "/etc/resolv.conf", None, MS_BIND)
        except OSError as e:
            raise subprocess.SubprocessError(f"entering the namespace: {e.strerror or e}") from None
        yield
    finally:
        if left_mnt:
            # Joining a mount namespace moves root and cwd to its root: put cwd back.
            setns(own_mnt, CLONE_NEWNS)
            os.fchdir(cwd)
        setns(own_net, CLONE_NEWNET)
        for fd in (own_net, own_mnt, cwd):
            os.close(fd)
