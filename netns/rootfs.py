"""Open a file inside another root (a container's) as its own processes would, and never outside it.

`/proc/PID/root/etc/resolv.conf` crosses into a container, but every symlink met after
that (`/etc -> /srv/host-dir`, `resolv.conf -> /etc/shadow`) resolves against *our* root,
and a plain open re-walks the path each time, so a check made before it proves nothing.
openat2(2) with RESOLVE_IN_ROOT resolves each component, symlinks and `..` included, as
if the directory given were `/`; RESOLVE_NO_MAGICLINKS refuses /proc's fd and root links,
which lead anywhere. RESOLVE_NO_XDEV is deliberately not set: a container's
/etc/resolv.conf is normally a bind mount (Docker, the kubelet), and crossing a mount
point inside the root does not leave it.

Only regular files of real file systems are handed out: the path is opened O_PATH first
(which opens nothing: no FIFO waits, no device runs its open handler), checked with
fstat/fstatfs, then reopened through /proc/self/fd, which is that same inode whatever
the path names by then. A /proc or /sys file is refused although fstat calls it regular:
writing one (core_pattern) is a host-wide change. Python has no openat2 wrapper; the
syscall lives here behind ctypes. Without it (Linux < 5.6) nothing is opened: there is
no safe fallback.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # the same number on every architecture
_RETRIES = 16  # EAGAIN: a rename raced a `..` walk and the kernel asks for another try
# Kernel interfaces that fstat calls regular files: never a resolver file, and writing them
# changes the host (statfs f_type values, linux/magic.h).
PROC_SUPER_MAGIC = 0x9FA0
_PSEUDO_FS = {PROC_SUPER_MAGIC: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
              0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs",
              0xCAFE4A11: "bpf", 0x62656570: "configfs", 0xDE5E81E4: "efivarfs", 0x6165676C: "pstore"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UnsafeFile(OSError):
    """A file refused for what it is or where it leads; str() is one line."""


class NotRegular(UnsafeFile):
    pass


class TooBig(UnsafeFile):
    pass


class Escapes(UnsafeFile):
    pass


class NoOpenat2(UnsafeFile):
    pass


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """`path` opened inside the directory `root_fd` as if it were `/` (absolute symlinks too)."""
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY  # openat2 allows no more with O_PATH
    how = _OpenHow(flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    err = 0
    for _ in range(_RETRIES):
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(root_fd), os.fsencode(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    if err == errno.ENOSYS:
        raise NoOpenat2("openat2 is not available (Linux 5.6 or later is needed): "
                        "refusing to open a container's files unsafely")
    if err == errno.EXDEV:
        raise Escapes(f"{path}: leads out of its root")
    if err == errno.ELOOP:
        raise Escapes(f"{path}: too many symlinks, or a /proc magic link")
    raise OSError(err, os.strerror(err), path)


def open_root(path: str) -> int:
    """An O_PATH fd of the directory `path` names here (e.g. /proc/PID/root): the `/` for what follows."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def stat_in(root_fd: int, path: str, follow: bool = True) -> os.stat_result:
    """stat (or, with follow=False, lstat) of `path` inside `root_fd`; nothing is opened for real."""
    fd = openat2(root_fd, path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def readlink_in(root_fd: int, path: str) -> str:
    """The text of the symlink `path` inside `root_fd` (its last component is not followed).
    A /proc link is refused: its magic links (/proc/N/root, cwd, exe, fd/*) print paths as
    *we* see them, the node's, and /proc/self names our own PID."""
    fd = openat2(root_fd, path, os.O_PATH | os.O_NOFOLLOW)
    try:
        if _fs_type(fd) == PROC_SUPER_MAGIC:
            raise PermissionError(errno.EACCES, f"{path}: a /proc link, not served (it would name a node path)")
        return os.readlink("", dir_fd=fd)
    finally:
        os.close(fd)


def open_dir(root_fd: int, path: str) -> int:
    """The directory `path` inside `root_fd`, opened for listing (O_DIRECTORY: never a FIFO or device)."""
    return openat2(root_fd, path, os.O_RDONLY | os.O_DIRECTORY)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _check_regular(fd: int, path: str) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(stat.S_IFMT(mode), "not a file")
        raise NotRegular(f"{path} is not a regular file ({kind})")
    fs = _PSEUDO_FS.get(_fs_type(fd))
    if fs:
        raise NotRegular(f"{path} is not a regular file (a {fs} file)")


def open_regular(root_fd: int, path: str, flags: int) -> int:
    """The existing regular file `path` inside `root_fd`, opened with `flags` (O_RDONLY, O_RDWR), non-blocking."""
    probe = openat2(root_fd, path, os.O_PATH)
    try:
        _check_regular(probe, path)
        return os.open(f"/proc/self/fd/{probe}", flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(probe)


def create_regular(root_fd: int, path: str, mode: int = 0o644) -> int:
    """A new empty file `path` inside `root_fd`, opened O_RDWR; FileExistsError if anything (a symlink too) is there."""
    fd = openat2(root_fd, path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, mode)
    os.fchmod(fd, mode)  # not narrowed by our umask
    return fd


def read_capped(fd: int, cap: int, path: str) -> bytes:
    """All of an open regular file from offset 0, refusing more than `cap` bytes."""
    data = b""
    while len(data) <= cap:
        chunk = os.pread(fd, cap + 1 - len(data), len(data))
        if not chunk:
            return data
        data += chunk
    raise TooBig(f"{path} is larger than {cap} bytes")


def read_regular(root: str, path: str, cap: int) -> bytes:
    """The regular file `path` inside the directory `root`, at most `cap` bytes."""
    root_fd = open_root(root)
    try:
        fd = open_regular(root_fd, path, os.O_RDONLY)
    finally:
        os.close(root_fd)
    try:
        return read_capped(fd, cap, path)
    finally:
        os.close(fd)
