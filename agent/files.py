"""The container's files, read-only, as SFTP on the session's own SSH connection (`run --mount`).

asyncssh's SFTPServer maps paths by string and then calls os.* functions that follow
symlinks against the agent's own root: a container's `/etc/x -> /node/secret` would be
served from the node. Every method served here therefore resolves its path inside the
container's root with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) (netns/rootfs.py),
and `map_path` refuses, so a base-class method this class forgot can only fail.

Files are read as the container's process could: the agent is root, so a file's owner,
group and mode are checked against the fs uid and groups of the target process (from
/proc/PID/status) before it is opened or listed; CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH in
its effective set lift the check, as they would for it. Search permission on the
directories above a file is not checked. Only regular files of real file systems open
(no FIFO, device, /proc or /sys file); a /proc link is never read (its magic links print
node paths). Nothing is ever written: every write operation is EROFS.

A container's file system may never answer. Paths are resolved in a copy of its mount tree
without the kinds that can hang (fsview.py, unless `--serve-fs` asks for them); every call
that touches a file system, opening the root included, runs in the connection's own bounded
threads with a time limit (fileworkers.py), never on the event loop; listings are read
LIST_CHUNK entries at a time as the client asks.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import threading
from dataclasses import dataclass
from typing import AsyncIterator, NoReturn

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from mirrord_tun.agent import fileworkers, fsview
from mirrord_tun.agent.containers import Process
from mirrord_tun.netns import rootfs

SUBSYSTEM = "sftp"
SFTP_VERSION = 3  # what sshfs speaks
MAX_READ = 4 * 1024 * 1024  # per request, whatever the client asks (asyncssh's own limit)
LIST_CHUNK = 128  # directory entries read per request (asyncssh sends at most 128 per READDIR)
_DAC_BYPASS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


@dataclass(frozen=True)
class Reader:
    """Whose permissions a read needs: the container process's."""

    uid: int
    gids: frozenset[int]
    bypass: bool  # it may read any file (CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH)

    def may_read(self, st: os.stat_result) -> bool:
        if self.bypass:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IRUSR)
        if st.st_gid in self.gids:
            return bool(st.st_mode & stat.S_IRGRP)
        return bool(st.st_mode & stat.S_IROTH)


def reader_of(process: Process) -> Reader:
    """The process's fs uid, groups and capabilities, as /proc/PID/status gives them."""
    fields: dict[str, list[str]] = {}
    try:
        with open(process.path("status")) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
    finally:
        process.confirm()  # raises if it had exited: what was read may be another process's
    # Uid:/Gid: are real, effective, saved, fs; file access is checked against fs.
    gids = {int(fields["Gid"][3]), *(int(g) for g in fields.get("Groups", []))}
    return Reader(int(fields["Uid"][3]), frozenset(gids), bool(int(fields["CapEff"][0], 16) & _DAC_BYPASS))


def _view_and_reader(process: Process, serve_fs: frozenset[str]) -> tuple[fsview.View, Reader]:
    reader = reader_of(process)  # first: a view made before a failure here would stay open
    return fsview.open_view(process, serve_fs), reader


@dataclass(frozen=True)
class Policy:
    """What the file service may ask (agent --serve-fs, --file-timeout)."""

    serve_fs: frozenset[str] = frozenset()  # kinds of file systems that can hang, served anyway (fsview.py)
    timeout: float = fileworkers.DEFAULT_TIMEOUT


def session_for(process: Process, policy: Policy, workers: fileworkers.Workers) -> SSHServerStreamSession:
    """An SSH session that runs the read-only SFTP server on the process's root, in `workers`' threads."""
    return SSHServerStreamSession(None, lambda chan: ContainerFiles(chan, process, policy, workers), SFTP_VERSION)


def _read_only(*_args: object) -> NoReturn:
    raise OSError(errno.EROFS, "read-only: the container's files are never written")


def _path(path: bytes) -> str:
    if b"\0" in path:  # ctypes would cut the name there
        raise OSError(errno.EINVAL, "bad path")
    return os.fsdecode(path) or "/"


def _attrs(st: os.stat_result) -> asyncssh.SFTPAttrs:
    # Numbers only: names from this host's passwd would be wrong for the container.
    return asyncssh.SFTPAttrs(size=st.st_size, uid=st.st_uid, gid=st.st_gid, permissions=st.st_mode,
                              atime=int(st.st_atime), mtime=int(st.st_mtime), nlink=st.st_nlink)


class ContainerFiles(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel, process: Process, policy: Policy,
                 workers: fileworkers.Workers) -> None:
        super().__init__(chan)
        self._process, self._policy, self._workers = process, policy, workers
        self._view: fsview.View | None = None
        self._reader = Reader(0, frozenset(), False)  # replaced with the process's in _root

    def exit(self) -> None:
        if self._view:
            self._view.close()  # O_PATH and nsfs fds: closing them never waits for a file system

    def map_path(self, path: bytes) -> bytes:
        raise PermissionError(errno.EACCES, "not served")

    def format_user(self, uid: int | None) -> str:
        return "" if uid is None else str(uid)

    format_group = format_user

    async def _root(self, path: bytes) -> tuple[int, str]:
        """The root fd to resolve `path` in, and `path` as text; refused if it names a file system
        that can hang. The first request builds the view (asyncssh serves a channel's requests in turn)."""
        if self._view is None:
            self._view, self._reader = await self._workers.call(
                lambda: _view_and_reader(self._process, self._policy.serve_fs),
                discard=lambda late: late[0].close())
        text = _path(path)
        why = self._view.refusal(posixpath.normpath("/" + text.lstrip("/")))
        if why:
            raise PermissionError(errno.EACCES, why)
        return self._view.root, text

    # Reading: every call that may touch the container's file systems runs in the workers

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> int:
        if pflags & ~asyncssh.FXF_READ:
            _read_only()
        return await self._workers.call(self._open, *await self._root(path), discard=os.close)

    def _open(self, root: int, path: str) -> int:
        fd = rootfs.open_regular(root, path, os.O_RDONLY)
        if not self._reader.may_read(os.fstat(fd)):
            os.close(fd)
            raise PermissionError(errno.EACCES, "the container's user may not read it")
        return fd

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return await self._workers.call(os.pread, _fd(file_obj), min(size, MAX_READ), offset)

    async def close(self, file_obj: object) -> None:
        # A FUSE file's close waits for its FLUSH: in the workers, done even if the request gives
        # up, and never an error (asyncssh closes every open file this way when the channel ends).
        with contextlib.suppress(OSError):
            await self._workers.call(os.close, _fd(file_obj), needed=True)

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        return _attrs(await self._workers.call(os.fstat, _fd(file_obj)))

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return _attrs(await self._workers.call(rootfs.stat_in, *await self._root(path), True))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return _attrs(await self._workers.call(rootfs.stat_in, *await self._root(path), False))

    async def readlink(self, path: bytes) -> bytes:
        return os.fsencode(await self._workers.call(rootfs.readlink_in, *await self._root(path)))

    def realpath(self, path: bytes) -> bytes:
        # Lexical: resolving it here would print where the container lives on the node.
        return posixpath.normpath(b"/" + path.lstrip(b"/"))

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        return asyncssh.SFTPVFSAttrs.from_local(await self._workers.call(_statvfs, *await self._root(path)))

    async def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        return asyncssh.SFTPVFSAttrs.from_local(await self._workers.call(os.fstatvfs, _fd(file_obj)))

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """The listing in chunks of LIST_CHUNK entries, each read when asyncssh asks for more: a
        directory of a million entries never sits in memory whole."""
        listing = await self._workers.call(_Listing, *await self._root(path), self._reader, discard=_Listing.close)
        try:
            while chunk := await self._workers.call(listing.next_chunk):
                for name in chunk:
                    yield name
        finally:  # also when asyncssh drops the listing unfinished (CLOSE of the handle)
            with contextlib.suppress(OSError):
                await self._workers.call(listing.close, needed=True)

    # Writing: never
    write = fsetstat = setstat = lsetstat = remove = mkdir = rmdir = rename = posix_rename = _read_only
    symlink = link = fsync = lock = unlock = _read_only


def _statvfs(root: int, path: str) -> os.statvfs_result:
    fd = rootfs.openat2(root, path, os.O_PATH)
    try:
        return os.fstatvfs(fd)
    finally:
        os.close(fd)


class _Listing:
    """An open directory, read a chunk at a time (in the workers)."""

    def __init__(self, root: int, path: str, reader: Reader) -> None:
        self._fd = rootfs.open_dir(root, path)
        try:
            st = os.fstat(self._fd)
            if not reader.may_read(st):
                raise PermissionError(errno.EACCES, "the container's user may not list it")
            self._entries = os.scandir(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._first: list[asyncssh.SFTPName] = [asyncssh.SFTPName(b".", attrs=_attrs(st))]
        self._lock = threading.Lock()  # a close never frees the directory under a read of it

    def next_chunk(self) -> list[asyncssh.SFTPName]:
        # fstatat on one component under the directory's fd, never following it: nothing here
        # walks a path the container could have bent.
        with self._lock:
            chunk, self._first = self._first, []
            for entry in self._entries:
                chunk.append(asyncssh.SFTPName(os.fsencode(entry.name),
                                               attrs=_attrs(entry.stat(follow_symlinks=False))))
                if len(chunk) >= LIST_CHUNK:
                    break
            return chunk

    def close(self) -> None:
        with self._lock:
            self._entries.close()
            os.close(self._fd)


def _fd(file_obj: object) -> int:
    if not isinstance(file_obj, int):
        raise OSError(errno.EBADF, "bad handle")
    return file_obj
