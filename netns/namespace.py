"""Network namespaces entered per thread.

setns(CLONE_NEWNET) binds only the calling thread, and every socket or device a
thread opens stays in the namespace it was opened in. So each namespace gets a
dedicated one-thread executor that enters it once; all work for that namespace
(netlink, TUN, nft, sysctl) is submitted there. Python 3.11 has no os.setns, so
the two syscalls live here behind ctypes, in one place.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
from typing import Callable, TypeVar

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def netns_id(fd: int) -> int:
    """Inode number that identifies a namespace, comparable across processes."""
    return os.fstat(fd).st_ino


class NetNs:
    """A network namespace plus the one thread that works inside it.

    `NetNs.open(path)` joins an existing namespace (`/run/netns/X`,
    `/proc/PID/ns/net`); `NetNs.new()` makes an anonymous one that lives as long
    as this object's fd or any process inside it.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        # Made here (`new`): it lives only as long as this object and the processes put in it, and
        # whatever is configured in it (routes, nft tables, addresses, a TUN) goes with it, so
        # nothing needs undoing in it at the end.
        self.private = path is None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netns")
        self.fd: int = self._pool.submit(self._enter).result()

    @classmethod
    def open(cls, path: str) -> "NetNs":
        return cls(path)

    @classmethod
    def new(cls) -> "NetNs":
        return cls(None)

    def _enter(self) -> int:
        if self._path is None:
            unshare(CLONE_NEWNET)
        else:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # Already there (an agent or sidecar working in its own namespace): setns
                # would need CAP_SYS_ADMIN for nothing.
                if netns_id(fd) != os.stat("/proc/thread-self/ns/net").st_ino:
                    setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def ident(self) -> int:
        return netns_id(self.fd)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn inside the namespace and wait for it."""
        return self._pool.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pids_in(ident: int) -> list[int]:
    """Processes whose network namespace is `ident` (see NetNs.ident)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ident:
                    out.append(int(entry))
            except OSError:
                pass
    return out
