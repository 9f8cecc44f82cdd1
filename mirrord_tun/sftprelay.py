"""The SFTP relay behind each `--mount`: sshfs's socket on one side, the current SFTP channel on the other.

sshfs (passive) cannot reconnect: its one pipe is its server. When `run` resumes its session over a
new SSH connection, the relay moves the mount to a new channel under sshfs, which never notices
(mounts.py starts sshfs and calls `attach` for each connection). So the relay frames SFTP and
keeps what a new server needs: sshfs's INIT (replayed; the new VERSION is kept from sshfs), every
request not yet answered (sent again: on a read-only mount all are idempotent), and the open
handles (`_Handles`), renamed so that an old server's handle never reaches a new one. A file open
across the outage is opened again by its path; a directory only if none of it was listed yet
(else its listing would repeat); a handle that could not be had again answers EIO. While there
is no channel, requests wait: the program blocks until the resume, and if the session is lost
for good, `run` ends and the mount with it (ENOTCONN). `_link_in_mount` keeps symbolic links
from leading out of the mount on this machine.
"""
from __future__ import annotations

import asyncio
import os
import posixpath
import sys
from dataclasses import dataclass

import asyncssh

from mirrord_tun import sshopts

SUBSYSTEM = "sftp"
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


class _Handles:
    """sshfs's open handles, each named by us, and what the current server calls it: sshfs never
    sees a server's handle, so an old server's never reaches a new one."""

    def __init__(self) -> None:
        self._ours: dict[bytes, _Handle] = {}  # the handle sshfs knows -> the server's
        self._next = 0
        self.reopening: dict[bytes, bytes] = {}  # our request id -> sshfs's handle

    def forget_server(self) -> None:
        """The server is gone, and every handle it gave with it."""
        self.reopening.clear()
        for h in self._ours.values():
            h.server = None

    def reopen_requests(self) -> list[bytes]:
        """The requests that open, on a new server, what sshfs still holds (and may be had again)."""
        out = []
        for n, (ours, h) in enumerate((o, h) for o, h in self._ours.items() if h.reopen is not None):
            req_id = n.to_bytes(4, "big")
            self.reopening[req_id] = ours
            assert h.reopen is not None
            out.append(_string(h.reopen[:1] + req_id + h.reopen[5:]))
        return out

    def reopened(self, p: bytes) -> None:
        """The new server's answer `p` to one of reopen_requests (an error leaves it without a server)."""
        ours = self.reopening.pop(p[5:9])
        if p[4] == _HANDLE:
            self._ours[ours].server = _string_at(p, 9)

    def answered(self, req: bytes, reply: bytes) -> bytes:
        """What the server's `reply` to sshfs's `req` does to the handles; the reply as sshfs must see it."""
        kind = req[4]
        if kind in (_OPEN, _OPENDIR) and reply[4] == _HANDLE:
            ours = self._next.to_bytes(4, "big")
            self._next += 1
            self._ours[ours] = _Handle(_string_at(reply, 9), req[4:5] + bytes(4) + req[9:])
            return _string(bytes([_HANDLE]) + reply[5:9] + _string(ours))
        if kind == _CLOSE:
            self._ours.pop(_string_at(req, 9), None)
        elif kind == _READDIR and (h := self._ours.get(_string_at(req, 9))):
            h.reopen = None  # listed from the start by a new server, entries would come twice
        return reply

    def to_server(self, p: bytes) -> bytes | None:
        """sshfs's request `p` with the server's handle in place of ours; None if its handle has no
        server now (`unserved` then answers it)."""
        at = _handle_at(p)
        if at is None:
            return p
        ours = _string_at(p, at)
        h = self._ours.get(ours)
        if h is None or h.server is None:
            return None
        return _string(p[4:at] + _string(h.server) + p[at + 4 + len(ours):])

    def unserved(self, p: bytes) -> bytes:
        """The answer to sshfs's request `p` whose handle no server has: a CLOSE is done, the rest fail."""
        if p[4] == _CLOSE:
            self._ours.pop(_string_at(p, 9), None)
            return _status(p[5:9], _FX_OK, b"")
        return _status(p[5:9], _FX_STALE, b"open before the agent connection dropped")


class SftpRelay:
    """Between sshfs's socket (`sshfs_side`), open as long as the mount, and the SFTP channel of
    the current SSH connection (`attach`), which a resume replaces."""

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
        self._handles = _Handles()
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
        self._handles.forget_server()
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
            print(f"mirrord-ns: --mount {self.path}: the agent sent a malformed SFTP packet", file=sys.stderr, flush=True)
            self.close()
            return
        for p in packets:
            if p[4] == _VERSION:
                self._on_version(p)
            elif p[5:9] in self._handles.reopening:
                self._on_reopened(p)
            else:
                self._on_reply(p)

    def _on_version(self, p: bytes) -> None:
        if not self._versioned:
            self._versioned = True
            self._to_sshfs(p)
        assert self.chan is not None
        for req in self._handles.reopen_requests():
            self.chan.write(req)
        if not self._handles.reopening:
            self._flush()

    def _on_reopened(self, p: bytes) -> None:
        self._handles.reopened(p)
        if not self._handles.reopening:
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
        if req[4] == _READLINK:
            p = _link_in_mount(os.fsencode(self.path), req, p)
        self._to_sshfs(self._handles.answered(req, p))

    # --- sshfs
    def sshfs_side(self) -> asyncio.Protocol:
        """The protocol for sshfs's socket."""
        return _Sshfs(self)

    def from_sshfs(self, data: bytes) -> None:
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
        out = self._handles.to_server(p)
        if out is None:
            del self._pending[req_id]
            self._to_sshfs(self._handles.unserved(p))
            return
        assert self.chan is not None
        self.chan.write(out)

    def _to_sshfs(self, p: bytes) -> None:
        if self.transport:
            self.transport.write(p)

    def sshfs_full(self, full: bool) -> None:
        """sshfs's socket is full (stop reading the channel) or drained again."""
        self._sshfs_full = full
        if self.chan and full:
            self.chan.pause_reading()
        elif self.chan:
            self.chan.resume_reading()

    def close(self) -> None:
        """sshfs sees its socket end (the mount then fails with ENOTCONN); the channel goes too."""
        self._closed = True
        chan, self.chan = self.chan, None
        if chan:
            chan.close()
        if self.transport:
            self.transport.close()


class _Sshfs(asyncio.Protocol):
    """sshfs's socket's events, for its relay."""

    def __init__(self, relay: SftpRelay) -> None:
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._relay.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._relay.from_sshfs(data)

    def eof_received(self) -> bool:
        self._relay.close()
        return False

    def pause_writing(self) -> None:
        self._relay.sshfs_full(True)

    def resume_writing(self) -> None:
        self._relay.sshfs_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.transport = None
        self._relay.close()


class _Channel(asyncssh.SSHClientSession[bytes]):
    """One SFTP channel's events, for the relay while it is the relay's current channel."""

    def __init__(self, relay: SftpRelay) -> None:
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


