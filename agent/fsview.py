"""The container's root as the file service sees it: without the file systems that can hang.

A network or userspace file system answers when its server does: a FUSE daemon that never
replies (a container with /dev/fuse and CAP_SYS_ADMIN can run one), an NFS or SMB server that
is gone. A thread that asks it then sleeps in the kernel until it answers, and a path walk
asks it as soon as it crosses into it (a LOOKUP), before anything could be checked. So the
file service does not walk the container's own mount tree: it walks a private copy of it
(a mount namespace of its own, made from the container's, propagation private so nothing
reaches the container) from which every such mount is lazily unmounted; a symlink into one
then finds the directory under it. Which kinds are refused is decided by the container's
/proc/PID/mountinfo, never by statfs(2), which would itself ask the hung file system.

Refused unless `agent --serve-fs KIND` (or `run --serve-fs KIND`) asks for them, by their
mountinfo types (with their statfs f_type magic for reference, linux/magic.h):
  fuse  - fuse, fuse.* (sshfs, s3fs, gcsfuse...), fuseblk, virtiofs     0x65735546
  nfs   - nfs, nfs4                                                      0x6969
  smb   - cifs, smb3, smbfs                                  0xFF534D42, 0xFE534D42, 0x517B
  9p    - 9p                                                             0x01021997
  ceph  - ceph                                                           0x00C36400
  afs   - afs                                                 0x5346414F, 0x6B414653
  other cluster file systems: lustre 0x0BD00BD0, gfs2 0x01161970, ocfs2 0x7461636F,
        glusterfs (over FUSE), orangefs 0x20030528, coda 0x73757245, beegfs, gpfs
The copy is taken when a file channel opens: a file system the container mounts later is
not in it (the next `run` sees it, with the same rule).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass, field

from mirrord_tun.agent.containers import Process
from mirrord_tun.netns import rootfs
from mirrord_tun.netns.namespace import CLONE_NEWNS, mount, setns, unshare

CLONE_FS = 0x00000200
MS_REC, MS_PRIVATE = 16384, 1 << 18
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
KINDS = {"fuse": "fuse", "fuseblk": "fuse", "virtiofs": "fuse", "nfs": "nfs", "nfs4": "nfs",
         "cifs": "smb", "smb3": "smb", "smbfs": "smb", "9p": "9p", "ceph": "ceph", "afs": "afs",
         "lustre": "cluster", "gfs2": "cluster", "ocfs2": "cluster", "glusterfs": "cluster",
         "orangefs": "cluster", "pvfs2": "cluster", "coda": "cluster", "beegfs": "cluster", "gpfs": "cluster"}
CHOICES = sorted({*KINDS.values(), "all"})
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger("mirrord-ns.agent")


def kind_of(fstype: str) -> str | None:
    """The refused kind a mountinfo type belongs to (`fuse.sshfs` is fuse), or None."""
    return KINDS.get(fstype.partition(".")[0])


@dataclass
class View:
    """An O_PATH fd of the root to resolve paths in, and what keeps its mount tree alive."""

    root: int
    refused: dict[str, str] = field(default_factory=dict)  # mount point in the container -> its type
    _ns: int | None = None  # the private copy's mount namespace: without it the copy falls apart

    def refusal(self, path: str) -> str | None:
        """Why `path` (as the client wrote it) is not served, if it names a refused mount or below."""
        for point, fstype in self.refused.items():
            if path == point or path.startswith(point.rstrip("/") + "/"):
                return f"{point} is a {fstype} file system, which can hang: not served (agent --serve-fs)"
        return None

    def close(self) -> None:
        for fd in (self.root, self._ns):
            if fd is not None:
                os.close(fd)


def mounts_of(pid: int) -> list[tuple[str, str]]:
    """(mount point as the process sees it, type) from /proc/PID/mountinfo, in mount order."""
    out = []
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")  # optional fields come before it
            point = fields[4].decode("unicode_escape")  # \040 for a space, as in /proc/mounts
            out.append((os.fsdecode(point.encode("latin-1")), fields[sep + 1].decode()))
    return out


def open_view(process: Process, allowed: frozenset[str]) -> View:
    """The process's root, without the mounts of kinds not in `allowed` ("all": the live root
    itself); ProcessLookupError if it has exited (its PID, and so what /proc/PID shows, may be
    another process's by now)."""
    try:
        view = _open_view(process, allowed)
    except OSError:
        process.confirm()  # gone: say that, not which of its /proc files vanished
        raise
    try:
        process.confirm()
    except ProcessLookupError:
        view.close()
        raise
    return view


def _open_view(process: Process, allowed: frozenset[str]) -> View:
    if "all" in allowed:
        return View(rootfs.open_root(process.path("root")))
    stacks: dict[str, list[str]] = {}
    for point, fstype in mounts_of(process.pid):
        stacks.setdefault(point, []).append(fstype)
    # At each point, the refused mounts on top (a walk stops at the topmost mount there).
    refused: dict[str, list[str]] = {}
    for point, stack in stacks.items():
        while stack and kind_of(stack[-1]) not in (None, *allowed):
            refused.setdefault(point, []).append(stack.pop())
    if "/" in refused:
        raise PermissionError(errno.EACCES, f"the container's root is a {refused['/'][0]} file system, which can "
                                            "hang: not served (agent --serve-fs)")
    got: list[View | OSError] = []
    # A thread of its own: it leaves our mount namespace and root, for good.
    worker = threading.Thread(target=lambda: got.append(_copy(process, refused)), name="mirrord-ns fsview")
    worker.start()
    worker.join()
    if isinstance(got[0], PermissionError):
        # No mount rights (an AppArmor profile that denies mount(2), no CAP_SYS_CHROOT): the live
        # root, where the refused mount points still answer EACCES by path and a request that
        # reaches one through a symlink is bounded by the workers' time limit.
        if refused:
            log.warning("cannot leave the container's %s out of the file service (%s); requests that reach "
                        "them through a link wait up to the file timeout", ", ".join(sorted(refused)), got[0])
        return View(rootfs.open_root(process.path("root")), {point: types[0] for point, types in refused.items()})
    if isinstance(got[0], OSError):
        raise got[0]
    return got[0]


def _copy(process: Process, refused: dict[str, list[str]]) -> View | OSError:
    opened: list[int] = []
    try:
        for path, flags in (("/proc", os.O_PATH | os.O_DIRECTORY), (process.path("ns/mnt"), os.O_RDONLY),
                            (process.path("root"), os.O_PATH | os.O_DIRECTORY)):
            opened.append(os.open(path, flags | os.O_CLOEXEC))
        process.confirm()  # before entering what they name
        proc, ns, root = opened
        unshare(CLONE_FS)  # this thread's root and cwd become its own
        setns(ns, CLONE_NEWNS)
        os.fchdir(root)  # unshare moves the cwd with us into the copy: the container's root there
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # an unmount here never reaches the container
        os.chroot(".")
        gone: list[str] = []
        for point in sorted(refused, key=len):  # outermost first: a walk never enters a refused one
            if not any(point.startswith(g.rstrip("/") + "/") for g in gone):  # gone with its parent
                for _ in refused[point]:
                    _umount(point)
                gone.append(point)
        view = View(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                    {point: types[0] for point, types in refused.items()})
        try:
            view._ns = os.open("thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        except OSError:
            view.close()
            raise
        return view
    except OSError as e:
        return e
    finally:
        for fd in opened:
            os.close(fd)


def _umount(point: str) -> None:
    if _libc.umount2(os.fsencode(point), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot leave out {point}: {os.strerror(err)}")
