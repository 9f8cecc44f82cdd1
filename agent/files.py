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
(no FIFO, device, /proc or /sys file). Nothing is ever written: every write operation is
EROFS. Blocking calls run in threads, off the event loop.
"""
from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import AsyncIterator, NoReturn

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from mirrord_tun.netns import rootfs

SUBSYSTEM = "sftp"
SFTP_VERSION = 3  # what sshfs speaks
MAX_READ = 4 * 1024 * 1024  # per request, whatever the client asks (asyncssh's own limit)
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


def reader_of(pid: int) -> Reader:
    """The fs uid, groups and capabilities of process `pid`, as /proc/PID/status gives them."""
    fields: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    # Uid:/Gid: are real, effective, saved, fs; file access is checked against fs.
    gids = {int(fields["Gid"][3]), *(int(g) for g in fields.get("Groups", []))}
    return Reader(int(fields["Uid"][3]), frozenset(gids), bool(int(fields["CapEff"][0], 16) & _DAC_BYPASS))


def session_for(pid: int) -> SSHServerStreamSession:
    """An SSH session that runs the read-only SFTP server on `pid`'s root."""
    return SSHServerStreamSession(None, lambda chan: ContainerFiles(chan, pid), SFTP_VERSION)


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
    def __init__(self, chan: asyncssh.SSHServerChannel, pid: int) -> None:
        super().__init__(chan)
        self._root = rootfs.open_root(f"/proc/{pid}/root")
        self._reader = reader_of(pid)

    def exit(self) -> None:
        os.close(self._root)

    def map_path(self, path: bytes) -> bytes:
        raise PermissionError(errno.EACCES, "not served")

    def format_user(self, uid: int | None) -> str:
        return "" if uid is None else str(uid)

    format_group = format_user

    # Reading

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> int:
        if pflags & ~asyncssh.FXF_READ:
            _read_only()
        return await asyncio.to_thread(self._open, _path(path))

    def _open(self, path: str) -> int:
        fd = rootfs.open_regular(self._root, path, os.O_RDONLY)
        if not self._reader.may_read(os.fstat(fd)):
            os.close(fd)
            raise PermissionError(errno.EACCES, "the container's user may not read it")
        return fd

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        fd, size = _fd(file_obj), min(size, MAX_READ)
        # What the page cache holds is copied here at once (RWF_NOWAIT never waits for the disk:
        # twice sshfs's throughput of a thread hop per request); the rest is read in a thread.
        buf = bytearray(size)
        try:
            got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise
            got = 0
        if got == size or offset + got >= os.fstat(fd).st_size:
            return bytes(buf[:got])
        return bytes(buf[:got]) + await asyncio.to_thread(os.pread, fd, size - got, offset + got)

    def close(self, file_obj: object) -> None:
        os.close(_fd(file_obj))

    def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        return _attrs(os.fstat(_fd(file_obj)))

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return _attrs(await asyncio.to_thread(rootfs.stat_in, self._root, _path(path), True))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return _attrs(await asyncio.to_thread(rootfs.stat_in, self._root, _path(path), False))

    async def readlink(self, path: bytes) -> bytes:
        return os.fsencode(await asyncio.to_thread(rootfs.readlink_in, self._root, _path(path)))

    def realpath(self, path: bytes) -> bytes:
        # Lexical: resolving it here would print where the container lives on the node.
        return posixpath.normpath(b"/" + path.lstrip(b"/"))

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        return asyncssh.SFTPVFSAttrs.from_local(await asyncio.to_thread(self._statvfs, _path(path)))

    def _statvfs(self, path: str) -> os.statvfs_result:
        fd = rootfs.openat2(self._root, path, os.O_PATH)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        return asyncssh.SFTPVFSAttrs.from_local(os.fstatvfs(_fd(file_obj)))

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        for name in await asyncio.to_thread(self._list, _path(path)):
            yield name

    def _list(self, path: str) -> list[asyncssh.SFTPName]:
        fd = rootfs.open_dir(self._root, path)
        try:
            st = os.fstat(fd)
            if not self._reader.may_read(st):
                raise PermissionError(errno.EACCES, "the container's user may not list it")
            names = [asyncssh.SFTPName(b".", attrs=_attrs(st))]
            # fstatat on one component under the directory's fd, never following it: nothing
            # here walks a path the container could have bent.
            with os.scandir(fd) as entries:
                for entry in entries:
                    names.append(asyncssh.SFTPName(os.fsencode(entry.name),
                                                   attrs=_attrs(entry.stat(follow_symlinks=False))))
            return names
        finally:
            os.close(fd)

    # Writing: never
    write = fsetstat = setstat = lsetstat = remove = mkdir = rmdir = rename = posix_rename = _read_only
    symlink = link = fsync = lock = unlock = _read_only


def _fd(file_obj: object) -> int:
    if not isinstance(file_obj, int):
        raise OSError(errno.EBADF, "bad handle")
    return file_obj
