"""`run --mount PATH`: the container's PATH, read-only and live, inside the command's mount namespace.

Each PATH is a FUSE mount served by Debian's `sshfs` in passive mode: it speaks SFTP on its
stdin/stdout, a socketpair that we relay to an `sftp` channel on the session's own SSH
connection (agent/files.py serves it, resolving every path inside the container's root).
When `run` resumes the session over a new connection, the relay (_Sftp) moves each mount to
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
import os
import posixpath
import shutil
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import asyncssh

from mirrord_tun import sshopts
from mirrord_tun.connect import SetupError, printable
from mirrord_tun.feature import Feature
from mirrord_tun.netns.namespace import mount

SUBSYSTEM = "sftp"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 1, 2, 4, 8, 4096, 16384
PR_SET_PDEATHSIG = 1
# Kubernetes volume kinds that hold what a program reads as configuration (not data volumes).
CONFIG_VOLUMES = ("config_map", "secret", "projected", "downward_api")
# Attributes and directory entries cached up to 1 s, as the kernel does for FUSE by default:
# a read then reaches the pod, a ConfigMap update shows within a second.
SSHFS_OPTIONS = "passive,ro,follow_symlinks,dcache_timeout=1,max_read=262144"
_libc = ctypes.CDLL(None, use_errno=True)


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


# SFTP v3 (draft-ietf-secsh-filexfer-02): uint32 length, byte type, uint32 id (none in INIT/VERSION).
_INIT, _VERSION, _OPEN, _CLOSE, _OPENDIR, _READDIR, _READLINK, _EXTENDED = 1, 2, 3, 4, 11, 12, 19, 200
_STATUS, _HANDLE, _NAME = 101, 102, 104
_HANDLE_FIRST = {_CLOSE, _READDIR, 5, 6, 8, 10}  # ... READ, WRITE, FSTAT, FSETSTAT: a handle after the id
_HANDLE_EXTENSIONS = {b"fsync@openssh.com", b"fstatvfs@openssh.com"}  # a handle after the name
_FX_OK, _FX_NO_SUCH_FILE = 0, 2
_FX_STALE = 0x100  # not an SFTP code: sshfs makes EIO of it
# Bigger is a broken or hostile peer (sshfs asks for 256 KiB at most; the agent sends 4 MiB at most).
_MAX_PACKET = 16 * 1024 * 1024


def _string(data: bytes) -> bytes:
    """An SSH string; an SFTP packet is one too (its length, then type, id and fields)."""
    return len(data).to_bytes(4, "big") + data


def _string_at(p: bytes, at: int) -> bytes:
    return p[at + 4:at + 4 + int.from_bytes(p[at:at + 4], "big")]


def _status(req_id: bytes, code: int, why: bytes) -> bytes:
    return _string(bytes([_STATUS]) + req_id + code.to_bytes(4, "big") + _string(why) + _string(b""))


@dataclass
class _Handle:
    """A file or directory sshfs holds open, as the current SFTP server knows it."""

    server: bytes | None  # the server's handle; None once its server is gone
    reopen: bytes | None  # the OPEN/OPENDIR request (id zeroed) to get it back from the next server


class _Sftp(asyncio.Protocol):
    """Between sshfs's socket, open as long as the mount, and the SFTP channel of the current
    SSH connection, which a resume replaces.

    sshfs (passive) cannot reconnect: its one pipe is its server. So the relay frames SFTP and
    keeps what a new server needs: sshfs's INIT (replayed; the new VERSION is kept from sshfs),
    every request not yet answered (sent again: on a read-only mount all are idempotent), and
    the open handles, renamed so that an old server's handle never reaches a new one. A file
    open across the outage is opened again by its path; a directory only if none of it was
    listed yet (else its listing would repeat); a handle that could not be had again answers
    EIO. While there is no channel, requests wait: the program blocks until the resume, and
    if the session is lost for good, `run` ends and the mount with it (ENOTCONN).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None  # sshfs's socket
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._from_sshfs = bytearray()
        self._from_server = bytearray()
        self._init: bytes | None = None  # sshfs's INIT, for every new server
        self._versioned = False  # sshfs has its VERSION
        self._ready = False  # the current server has sshfs's handles and takes requests
        self._pending: dict[bytes, bytes] = {}  # request id -> sshfs's request, until answered
        self._handles: dict[bytes, _Handle] = {}  # sshfs's handle -> ours
        self._next_handle = 0
        self._reopening: dict[bytes, bytes] = {}  # our request id -> sshfs's handle
        self._sshfs_full = False
        self._closed = False

    # --- the channel
    async def attach(self, conn: asyncssh.SSHClientConnection) -> None:
        """Serve the mount over a new SFTP channel of `conn`."""
        self._detach()
        chan, _ = await conn.create_session(lambda: _Channel(self), subsystem=SUBSYSTEM, encoding=None,
                                            window=sshopts.WINDOW, max_pktsize=sshopts.MAX_PKTSIZE)
        if self._closed:  # the mount ended while the channel opened
            chan.close()
            return
        self.chan = chan
        if self._sshfs_full:
            chan.pause_reading()
        if self._init is not None:
            chan.write(self._init)

    def _detach(self) -> None:
        self.chan, self._ready = None, False
        self._from_server.clear()
        self._reopening.clear()
        for h in self._handles.values():
            h.server = None
        if self.transport:
            self.transport.resume_reading()  # it may have been paused for the old channel

    def channel_lost(self, chan: asyncssh.SSHClientChannel[bytes], dropped: bool) -> None:
        if chan is not self.chan:
            return
        self._detach()
        if not dropped:  # the agent closed this channel on a live connection: no resume brings it back
            self.close()

    def from_server(self, data: bytes) -> None:
        self._from_server += data
        try:
            packets = _split(self._from_server)
        except ValueError:
            _warn(f"--mount {self.path}: the agent sent a malformed SFTP packet")
            self.close()
            return
        for p in packets:
            if p[4] == _VERSION:
                self._on_version(p)
            elif p[5:9] in self._reopening:
                self._on_reopened(p)
            else:
                self._on_reply(p)

    def _on_version(self, p: bytes) -> None:
        if not self._versioned:
            self._versioned = True
            self._to_sshfs(p)
        for n, (ours, h) in enumerate((o, h) for o, h in self._handles.items() if h.reopen is not None):
            req_id = n.to_bytes(4, "big")
            self._reopening[req_id] = ours
            assert self.chan is not None and h.reopen is not None
            self.chan.write(_string(h.reopen[:1] + req_id + h.reopen[5:]))
        if not self._reopening:
            self._flush()

    def _on_reopened(self, p: bytes) -> None:
        ours = self._reopening.pop(p[5:9])
        if p[4] == _HANDLE:
            self._handles[ours].server = _string_at(p, 9)
        if not self._reopening:
            self._flush()

    def _flush(self) -> None:
        self._ready = True
        for req_id, p in list(self._pending.items()):
            self._forward(req_id, p)

    def _on_reply(self, p: bytes) -> None:
        req_id = p[5:9]
        req = self._pending.pop(req_id, None)
        if req is None:
            return
        kind = req[4]
        if kind in (_OPEN, _OPENDIR) and p[4] == _HANDLE:
            ours = self._next_handle.to_bytes(4, "big")
            self._next_handle += 1
            self._handles[ours] = _Handle(_string_at(p, 9), req[4:5] + bytes(4) + req[9:])
            p = _string(bytes([_HANDLE]) + req_id + _string(ours))
        elif kind == _CLOSE:
            self._handles.pop(_string_at(req, 9), None)
        elif kind == _READDIR and (h := self._handles.get(_string_at(req, 9))):
            h.reopen = None  # listed from the start by a new server, entries would come twice
        elif kind == _READLINK:
            p = _link_in_mount(os.fsencode(self.path), req, p)
        self._to_sshfs(p)

    # --- sshfs
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._from_sshfs += data
        try:
            packets = _split(self._from_sshfs)
        except ValueError:
            self.close()
            return
        for p in packets:
            if p[4] == _INIT:
                self._init = p
                if self.chan:
                    self.chan.write(p)
                continue
            self._pending[p[5:9]] = p
            if self._ready:
                self._forward(p[5:9], p)

    def _forward(self, req_id: bytes, p: bytes) -> None:
        """sshfs's request to the server, with the server's handle in place of sshfs's."""
        at = _handle_at(p)
        if at is not None:
            ours = _string_at(p, at)
            h = self._handles.get(ours)
            if h is None or h.server is None:
                del self._pending[req_id]
                if p[4] == _CLOSE:
                    self._handles.pop(ours, None)
                    self._to_sshfs(_status(req_id, _FX_OK, b""))
                else:
                    self._to_sshfs(_status(req_id, _FX_STALE, b"open before the agent connection dropped"))
                return
            p = _string(p[4:at] + _string(h.server) + p[at + 4 + len(ours):])
        assert self.chan is not None
        self.chan.write(p)

    def _to_sshfs(self, p: bytes) -> None:
        if self.transport:
            self.transport.write(p)

    def eof_received(self) -> bool:
        self.close()
        return False

    def pause_writing(self) -> None:
        self._sshfs_full = True
        if self.chan:
            self.chan.pause_reading()

    def resume_writing(self) -> None:
        self._sshfs_full = False
        if self.chan:
            self.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.close()

    def close(self) -> None:
        """sshfs sees its socket end (the mount then fails with ENOTCONN); the channel goes too."""
        self._closed = True
        chan, self.chan = self.chan, None
        if chan:
            chan.close()
        if self.transport:
            self.transport.close()


class _Channel(asyncssh.SSHClientSession[bytes]):
    """One SFTP channel's events, for the relay while it is the relay's current channel."""

    def __init__(self, relay: _Sftp) -> None:
        self._relay = relay
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._chan is self._relay.chan:
            self._relay.from_server(data)

    def pause_writing(self) -> None:
        if self._chan is self._relay.chan and self._relay.transport:
            self._relay.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._chan is self._relay.chan and self._relay.transport:
            self._relay.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        assert self._chan is not None
        self._relay.channel_lost(self._chan, dropped=exc is not None)


def _split(buf: bytearray) -> list[bytes]:
    """The whole packets at the start of `buf`, taken out of it; ValueError for a length no
    SFTP packet has (each has a type and an id or version: 5 bytes at least)."""
    out, at = [], 0
    while len(buf) - at >= 4:
        size = int.from_bytes(buf[at:at + 4], "big")
        if not 5 <= size <= _MAX_PACKET:
            raise ValueError(size)
        end = at + 4 + size
        if len(buf) < end:
            break
        out.append(bytes(buf[at:end]))
        at = end
    del buf[:at]
    return out


def _link_in_mount(mount: bytes, req: bytes, reply: bytes) -> bytes:
    """The agent's answer to READLINK `req`, as the kernel here may follow it: a relative path
    that stays inside the mount, or ENOENT. sshfs hands a link's text to this machine's kernel,
    which resolves it against *this* machine: `/home/me/.ssh/id_ed25519` or `../../../etc/shadow`
    from the container (or from a hostile agent) would open a laptop file. The target is resolved
    by its text from the link's directory (sshfs names every file by its path in the container,
    which is its path under the mount here too); inside the mount it comes back normalized, all
    its `..` first, so no link met later can turn it outside."""
    if reply[4] != _NAME:
        return reply  # an error status
    link, target = _string_at(req, 9), _string_at(reply, 13)
    if int.from_bytes(reply[9:13], "big") != 1:
        target = b"/"  # not an answer to READLINK: never passed on as one
    base = posixpath.dirname(link)
    whole = b"/" + posixpath.normpath(posixpath.join(base, target)).lstrip(b"/")  # normpath keeps a "//"
    inside = [p for p in (whole, base) if p == mount or p.startswith(mount + b"/")]
    if len(inside) < 2:
        return _status(reply[5:9], _FX_NO_SUCH_FILE, b"a link out of the mount, not followed here")
    rel = posixpath.relpath(whole, base)
    return _string(bytes([_NAME]) + reply[5:9] + (1).to_bytes(4, "big") + _string(rel) + _string(rel) + bytes(4))


def _handle_at(p: bytes) -> int | None:
    """Where the handle string of request `p` starts, if it names one."""
    if p[4] in _HANDLE_FIRST:
        return 9
    if p[4] == _EXTENDED and _string_at(p, 9) in _HANDLE_EXTENSIONS:
        return 13 + int.from_bytes(p[9:13], "big")
    return None


@dataclass
class _Mount:
    relay: _Sftp
    theirs: socket.socket  # sshfs's stdin/stdout
    proc: subprocess.Popen[bytes] | None = None

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
        self.paths = _distinct(self.paths + [v for v in self.volumes if v not in covering and v not in rootless])
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
        relay = _Sftp(path)
        self._mounts.append(_Mount(relay, theirs))
        await relay.attach(conn)
        await asyncio.get_running_loop().create_unix_connection(lambda: relay, sock=ours)

    def reopen(self, conn: asyncssh.SSHClientConnection) -> None:
        """After a resume: every mount served again over `conn`, in the background (what waited
        meanwhile goes on once its channel is open)."""
        for m in self._mounts:
            task = asyncio.ensure_future(self._reattach(m.relay, conn))
            self._reopening.add(task)
            task.add_done_callback(self._reopening.discard)

    @staticmethod
    async def _reattach(relay: _Sftp, conn: asyncssh.SSHClientConnection) -> None:
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
            finally:
                # Then sshfs alone holds the device and the socket: once it is gone, the mount
                # fails with ENOTCONN instead of hanging the command.
                os.close(fuse)
                m.theirs.close()

    def lost(self) -> None:
        """The session is over: every mount fails now (ENOTCONN). A read waiting for a resume
        that will not come cannot be killed (FUSE waits for sshfs's answer), so it would hold
        its program, and `run` waiting for it, past SIGKILL."""
        for m in self._mounts:
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
    print(f"mirrord-ns: {text}", file=sys.stderr, flush=True)


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
                            stdin=sock.fileno(), stdout=sock.fileno(), pass_fds=(fuse,),
                            preexec_fn=die_with_parent, start_new_session=True)


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
