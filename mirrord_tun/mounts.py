"""`run --mount PATH`: the container's PATH, read-only and live, inside the command's mount namespace.

Each PATH is a FUSE mount served by Debian's `sshfs` in passive mode: it speaks SFTP on its
stdin/stdout, a socketpair that we relay to an `sftp` channel on the session's own SSH
connection (agent/files.py serves it, resolving every path inside the container's root).
When `run` resumes the session over a new connection, the relay (sftprelay.py) moves each mount to
a new channel of it, under sshfs, which never notices.
sshfs over the channel was chosen over pyfuse3 by measurement (scripts/bench_files.py) and
because pyfuse3 needs libfuse3-dev and a compiler to install.

We mount /dev/fuse ourselves, from the thread that builds the command's private mount
namespace (netns/exec.py), and hand sshfs the open device as `/dev/fd/N` (libfuse ≥ 3.3).
So the mount exists in that namespace alone, before the command starts and without
waiting for sshfs (the kernel holds requests until sshfs answers FUSE's INIT), and it
goes away with the namespace: when the command and sshfs are gone, also after kill -9 of
`run` (sshfs has a parent-death signal and sees its socket close). The namespace is
MS_PRIVATE, so nothing reaches the host's mount table.

The mount point is PATH itself. When PATH does not exist on this machine, its nearest
existing ancestor is shadowed in the namespace by a tmpfs holding the ancestor's entries
bind-mounted back (so the command still sees and writes the real ones), in which the
missing directories are made: the host's filesystem is never written. `/` itself is
never shadowed: PATH must then be created by hand.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import asyncssh

from mirrord_tun.connect import SetupError, printable
from mirrord_tun.feature import Feature
from mirrord_tun.netns.namespace import mount
from mirrord_tun.sftprelay import SftpRelay

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 1, 2, 4, 8, 4096, 16384
PR_SET_PDEATHSIG = 1
# Kubernetes volume kinds that hold what a program reads as configuration (not data volumes).
CONFIG_VOLUMES = ("config_map", "secret", "projected", "downward_api")
# Where the target's volumes go by default: each to a directory of its own, new on this machine,
# under one of these. The pod spec's author is not trusted (SECURITY.md), and anywhere else (/usr,
# a home, a venv, the current directory) a directory of theirs could give this machine's programs
# code or settings: a .pth file in a site-packages runs in every Python, noexec mount or not.
VOLUME_ROOTS = ("/etc", "/opt", "/srv", "/mnt", "/media", "/var/lib", "/run/secrets", "/var/run/secrets")
# Names in /etc that programs read when they exist (Go's CAs in /etc/pki, pip's /etc/xdg/pip, ...).
ETC_NAMES_READ = ("pki", "xdg", "ssl", "ca-certificates", "crypto-policies", "python", "perl", "pip", "npm",
                  "node", "yarn", "git", "mercurial", "subversion", "containers", "docker", "ssh", "gnupg", "sudo",
                  "profile", "bash", "zsh", "ld.so", "environment", "systemd", "security", "pam", "java", "jvm",
                  "maven", "gradle", "ruby", "gem", "krb5", "openssl", "curl", "wget", "vim", "emacs", "x11",
                  "fonts", "dconf", "gtk", "polkit", "dbus", "apt", "dpkg", "alternatives", "udev", "modprobe",
                  "cron", "sysctl", "default", "init", "kube", "helm", "cni", "nix")
# Attributes and directory entries cached up to 1 s, as the kernel does for FUSE by default:
# a read then reaches the pod, a ConfigMap update shows within a second.
SSHFS_OPTIONS = "passive,ro,follow_symlinks,dcache_timeout=1,max_read=262144"
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger("mirrord-ns.mounts")


def volume_mount_paths(pod: Any, container: str) -> list[str]:
    """The container's mount paths of ConfigMap, Secret, projected (service-account token) and
    downward-API volumes, from a V1Pod: what `run --target` mounts by default."""
    volumes = {v.name: v for v in (pod.spec.volumes or [])}
    for c in pod.spec.containers or []:
        if c.name == container:
            return sorted({m.mount_path for m in c.volume_mounts or []
                           if m.name in volumes and not m.sub_path
                           and any(getattr(volumes[m.name], kind, None) for kind in CONFIG_VOLUMES)})
    return []


@dataclass
class _Mount:
    relay: SftpRelay
    theirs: socket.socket  # sshfs's stdin/stdout
    proc: subprocess.Popen[bytes] | None = None
    ended: bool = False  # we stopped it or lost its channel: what sshfs says next is about that

    @property
    def path(self) -> str:
        return self.relay.path


@dataclass
class Mounts:
    """The container's directories for one command: checked, then mounted in its namespace."""

    paths: list[str]  # --mount: the user's choice
    # The target's volumes (volume_mount_paths): the pod spec's author chose them, so they only
    # go where this machine has nothing (a missing path or an empty directory), never over /usr/bin.
    volumes: list[str] = field(default_factory=list)
    _mounts: list[_Mount] = field(default_factory=list)
    _reopening: set[asyncio.Task[None]] = field(default_factory=set)

    async def prepare(self, conn: asyncssh.SSHClientConnection) -> None:
        """Check every PATH in the container and open its channel; SetupError (one line) if any is
        missing, not a directory, or the agent serves no files."""
        if not shutil.which("sshfs"):
            raise SetupError("--mount needs sshfs (apt-get install sshfs)")
        refused = {v: why for v in self.volumes if v not in self.paths and (why := _refusal(v))}
        if refused:
            _warn(f"not mounting the target's volumes at {', '.join(f'{v} ({why})' for v, why in refused.items())} "
                  "(--mount PATH to have them anyway)")
        self.volumes = [v for v in self.volumes if v not in refused]
        covering = [v for v in self.volumes if v not in self.paths and not _vacant(v)]
        if covering:
            _warn(f"not mounting the target's volumes over this machine's files: {' '.join(covering)} "
                  "(--mount PATH to have them anyway)")
        # A volume at /config needs /config here: making it would mean shadowing /, which we never do.
        rootless = [v for v in self.volumes if v not in self.paths and v not in covering and not _placeable(v)]
        if rootless:
            _warn(f"not mounting the target's volumes at {' '.join(rootless)}: no such directory on this "
                  "machine (mirrord-ns never shadows /; create it to have the volume there)")
        explicit = bool(self.paths)
        placed = [v for v in self.volumes if v not in covering and v not in rootless]
        self.paths = _distinct(_outermost(self.paths, placed))
        if not self.paths:
            return
        try:
            async with conn.start_sftp_client() as sftp:
                for path in self.paths:
                    await _check(sftp, path)
            for path in self.paths:
                await self._open(conn, path)
        except asyncssh.ChannelOpenError as e:
            why = f"the agent serves no files ({printable(e.reason)}); it does with --pid or --container-id"
            if explicit:
                raise SetupError(f"--mount: {why}") from None
            _warn(f"not mounting the target's volumes: {why}")  # an older agent: the session still runs
            self.paths = []
        except asyncssh.Error as e:
            raise SetupError(f"--mount: {printable(str(e))}") from None

    async def _open(self, conn: asyncssh.SSHClientConnection, path: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        relay = SftpRelay(path)
        self._mounts.append(_Mount(relay, theirs))
        await relay.attach(conn)
        await asyncio.get_running_loop().create_unix_connection(relay.sshfs_side, sock=ours)

    def reopen(self, conn: asyncssh.SSHClientConnection) -> None:
        """After a resume: every mount served again over `conn`, in the background (what waited
        meanwhile goes on once its channel is open)."""
        for m in self._mounts:
            task = asyncio.ensure_future(self._reattach(m.relay, conn))
            self._reopening.add(task)
            task.add_done_callback(self._reopening.discard)

    @staticmethod
    async def _reattach(relay: SftpRelay, conn: asyncssh.SSHClientConnection) -> None:
        try:
            await relay.attach(conn)
        except asyncssh.ChannelOpenError as e:  # the agent no longer serves it: fail now, not at the session's end
            _warn(f"--mount {relay.path}: the agent refused it after the reconnect ({printable(e.reason)})")
            relay.close()
        except (asyncssh.Error, OSError):
            pass  # this connection died too: the next resume tries again

    def mount_here(self) -> None:
        """In the command's private mount namespace, before it starts: a FUSE mount at each PATH,
        its sshfs started. OSError (one line) if a mount point cannot be made."""
        shadowed: set[str] = set()
        for m in self._mounts:
            _mount_point(m.path, shadowed)
            fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            try:
                # noexec: what the container serves is read, never run as the user on this machine.
                mount(f"mirrord-ns:{m.path}", m.path, "fuse.sshfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      f"fd={fuse},rootmode=40000,user_id=0,group_id=0,allow_other")
                m.proc = _start_sshfs(m.path, fuse, m.theirs)
                # Not from here: a thread made by this one would share its private root and mounts,
                # and this one could not go back to its own (setns refuses a shared fs).
                asyncio.get_running_loop().call_soon(_relay_stderr_thread, m)
            finally:
                # Then sshfs alone holds the device and the socket: once it is gone, the mount
                # fails with ENOTCONN instead of hanging the command.
                os.close(fuse)
                m.theirs.close()

    def ending(self) -> None:
        """The command is over: sshfs is about to be stopped, and may say so."""
        for m in self._mounts:
            m.ended = True

    def lost(self) -> None:
        """The session is over: every mount fails now (ENOTCONN). A read waiting for a resume
        that will not come cannot be killed (FUSE waits for sshfs's answer), so it would hold
        its program, and `run` waiting for it, past SIGKILL."""
        for m in self._mounts:
            m.ended = True
            m.relay.close()

    async def stop(self) -> None:
        for task in self._reopening:
            task.cancel()
        self.lost()
        for m in self._mounts:
            if m.proc:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.terminate()
        for m in self._mounts:
            if m.proc:
                try:
                    await asyncio.wait_for(asyncio.to_thread(m.proc.wait), 2)
                except asyncio.TimeoutError:
                    m.proc.kill()
                    m.proc.wait()
            m.theirs.close()


class MountsFeature(Feature):
    """--mount in a session: checked and opened before the namespace, served again after a resume."""

    def __init__(self, mounts: Mounts, conn: Callable[[], asyncssh.SSHClientConnection | None]) -> None:
        self.mounts, self._conn = mounts, conn  # conn(): the link's current connection

    async def start(self) -> None:
        conn = self._conn()
        assert conn is not None
        await self.mounts.prepare(conn)

    def on_resume(self) -> None:
        conn = self._conn()
        assert conn is not None
        self.mounts.reopen(conn)

    def on_lost(self) -> None:
        self.mounts.lost()

    async def stop(self) -> None:
        await self.mounts.stop()


def _warn(text: str) -> None:
    log.warning("%s", text)  # through logging: -q leaves it out


def _refusal(path: str) -> str | None:
    """Why a volume may not go to `path` by default, or None: see VOLUME_ROOTS. Checked as
    written and through this machine's symlinks (/var/run is /run here)."""
    if ".." in path.split("/"):  # the API takes it; what we mount is the normalized path, so say no
        return "a path with .."
    written = os.path.normpath(path)
    ancestor = written
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    resolved = os.path.normpath(os.path.join(os.path.realpath(ancestor), os.path.relpath(written, ancestor)))
    for p in (written, resolved):
        root = next((r for r in VOLUME_ROOTS if p.startswith(r + "/")), None)
        if root is None:
            return f"not in a directory of its own under {', '.join(VOLUME_ROOTS[:-1])}"
        own = os.path.join(root, p[len(root) + 1:].split("/")[0])
        if root == "/etc" and os.path.basename(own).lower().startswith(ETC_NAMES_READ):
            return f"{own} is read by programs here"
        if own != p and os.path.lexists(own):
            return f"inside this machine's {own}"
    return None


def _vacant(path: str) -> bool:
    try:
        return not os.listdir(path)
    except FileNotFoundError:
        return not os.path.lexists(path)  # a dangling symlink is not vacant
    except OSError:
        return False


def _placeable(path: str) -> bool:
    """Whether _mount_point can make `path` here: it exists, or its nearest existing ancestor
    is a directory other than / (the one directory never shadowed)."""
    ancestor = os.path.normpath(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor == os.path.normpath(path) or (os.path.realpath(ancestor) != "/" and os.path.isdir(ancestor))


def _outermost(paths: list[str], volumes: list[str]) -> list[str]:
    """`paths` and `volumes` without those inside one of the volumes, or a volume inside a path: the
    agent serves a directory with what the container mounts below it (a Secret at /etc/app/tls in
    a ConfigMap at /etc/app is common), so the outer mount shows both."""
    def inside(p: str, outer: str) -> bool:
        return os.path.normpath(p).startswith(os.path.normpath(outer).rstrip("/") + "/")
    kept = [v for v in volumes if not any(inside(v, o) for o in paths + volumes)]
    return [p for p in paths if not any(inside(p, v) for v in kept)] + kept


def _distinct(paths: list[str]) -> list[str]:
    """Absolute, normalized, each once; none inside another (its mount point would be looked up
    through a FUSE mount whose sshfs waits for the loop we would be blocking)."""
    out = sorted({os.path.normpath(p) for p in paths})
    for p in out:
        if not os.path.isabs(p) or p == "/":
            raise SetupError(f"--mount {p}: give an absolute path below /")
        for outer in out:
            if p.startswith(outer + "/"):
                raise SetupError(f"--mount {p}: inside --mount {outer}; give one of them")
    return out


async def _check(sftp: asyncssh.SFTPClient, path: str) -> None:
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        raise SetupError(f"--mount {path}: no such directory in the container") from None
    except asyncssh.SFTPError as e:
        raise SetupError(f"--mount {path}: {printable(e.reason)}") from None
    if not stat.S_ISDIR(attrs.permissions or 0):
        raise SetupError(f"--mount {path}: not a directory in the container")


def _start_sshfs(path: str, fuse: int, sock: socket.socket) -> subprocess.Popen[bytes]:
    parent = os.getpid()

    def die_with_parent() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    # `-f`: stay our child; the host part of the remote is a label in passive mode.
    return subprocess.Popen(["sshfs", "-f", "-o", SSHFS_OPTIONS, f"mirrord-ns:{path}", f"/dev/fd/{fuse}"],
                            stdin=sock.fileno(), stdout=sock.fileno(), stderr=subprocess.PIPE, pass_fds=(fuse,),
                            preexec_fn=die_with_parent, start_new_session=True)


def _relay_stderr_thread(m: _Mount) -> None:
    threading.Thread(target=_relay_stderr, args=(m,), name="sshfs-stderr", daemon=True).start()


def _relay_stderr(m: _Mount) -> None:
    """sshfs's own lines, as ours, while its mount is served. Once we end it, sshfs says so
    ("read: Interrupted system call", "remote host has disconnected"): not the user's business."""
    assert m.proc is not None and m.proc.stderr is not None
    with m.proc.stderr:
        for line in m.proc.stderr:
            if not m.ended:
                log.warning("--mount %s: sshfs: %s", m.path, printable(line.decode(errors="replace").strip()))


def _mount_point(path: str, shadowed: set[str]) -> None:
    """Make `path` a directory in this (private) mount namespace without writing the host's files."""
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise OSError(errno.ENOTDIR, f"--mount {path}: not a directory on this machine")
    missing: list[str] = []
    ancestor = path
    while not os.path.lexists(ancestor):
        missing.insert(0, os.path.basename(ancestor))
        ancestor = os.path.dirname(ancestor)
    ancestor = os.path.realpath(ancestor)
    if ancestor == "/" or not os.path.isdir(ancestor):
        raise OSError(errno.ENOENT, f"--mount {path}: create it on this machine first "
                                    f"(mirrord-ns never shadows {ancestor})")
    if ancestor not in shadowed:
        _shadow(ancestor)
        shadowed.add(ancestor)
    os.makedirs(os.path.join(ancestor, *missing), exist_ok=True)


def _shadow(directory: str) -> None:
    """A tmpfs over `directory` holding its entries, each the original bind-mounted back."""
    old = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(old)
        mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV,
              f"mode={stat.S_IMODE(st.st_mode):o},uid={st.st_uid},gid={st.st_gid}")
        below = f"/proc/self/fd/{old}"
        for entry in os.scandir(below):
            source, target = os.path.join(below, entry.name), os.path.join(directory, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(source), target)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            mount(source, target, None, MS_BIND | MS_REC)
    finally:
        os.close(old)
