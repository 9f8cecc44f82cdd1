"""Give an existing namespace's programs the pod's resolver, and take it back.

A running container reads /etc/resolv.conf from its own file (Docker bind-mounts
one per container, and containers joined with `network_mode: service:X` share
X's). That file is opened once, inside the container's root (netns/rootfs.py:
its symlinks resolve in the container, never on this host), and everything goes
through that one descriptor: reading the original, writing the pod's (in place: a
bind-mounted file cannot be replaced by rename), putting the original back.
Whatever the container does to its paths meanwhile, no other file is touched.

What must be put back (the original bytes, or "there was no file") is kept in
root's own state, STATE_DIR/resolv.<st_dev>.<st_ino>.json, never read back out of
the file the container can edit. A killed attach's successor, or `mirrord-ns
cleanup` (`restore_leftovers`), restores from it only through a file that it
opens again the same way and that is the very inode recorded.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from mirrord_tun.netns import rootfs

STATE_DIR = "/run/mirrord-ns"
MAX_BYTES = 64 * 1024  # a resolver file is a few lines; a bigger original is refused, not copied
HEADER = "# mirrord-ns: the pod's resolver; detaching puts the original back\n"


@dataclass(frozen=True)
class Place:
    root: str  # resolved as `/`: a container's /proc/PID/root, or "/" for this host's own paths
    path: str  # the file, as the namespace's programs name it
    make_dir: bool = False  # its directory may be made, and removed again (root's /etc/netns/NAME only)


class Busy(OSError):
    """Another live attach has rewritten this file."""


def _starttime(pid: int) -> str | None:
    """A process's start time, which tells it from a later process given the same PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(record: dict[str, Any]) -> bool:
    pid, start = record["owner"]
    return _starttime(pid) == start


def _state_path(ident: tuple[int, int]) -> str:
    return os.path.join(STATE_DIR, f"resolv.{ident[0]}.{ident[1]}.json")


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save(path: str, record: dict[str, Any]) -> None:
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    os.chmod(STATE_DIR, 0o700)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)  # whole or not at all, whenever we are killed


def _overwrite(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)
    os.ftruncate(fd, len(data))


class Held:
    """One resolver file, open from before the pod's text is written until the original is back."""

    def __init__(self, place: Place, root_fd: int, fd: int, made: bool, made_dir: bool) -> None:
        self.place, self.root_fd, self.fd = place, root_fd, fd
        self.made, self.made_dir = made, made_dir  # we created the file / its directory
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.state = _state_path(self.ident)
        self.record: dict[str, Any] | None = None  # set once installed: what restore puts back
        self.written = False

    @classmethod
    def open(cls, place: Place, create: bool = True) -> "Held":
        """The file `place` names, opened read-write; made (empty) when missing and `create`.
        rootfs.UnsafeFile when it is not a regular file or leads out of its root."""
        made_dir = False
        if create and place.make_dir and place.root == "/" and not os.path.isdir(os.path.dirname(place.path)):
            os.makedirs(os.path.dirname(place.path))
            made_dir = True
        root_fd = rootfs.open_root(place.root)
        try:
            try:
                return cls(place, root_fd, rootfs.open_regular(root_fd, place.path, os.O_RDWR), False, made_dir)
            except FileNotFoundError:
                if not create:
                    raise
            # Never a directory in a container: only the file, where its directory already is.
            return cls(place, root_fd, rootfs.create_regular(root_fd, place.path), True, made_dir)
        except BaseException:
            os.close(root_fd)
            if made_dir:
                os.rmdir(os.path.dirname(place.path))
            raise

    def same_file(self, path: str) -> bool:
        """Whether `path` (resolved here, in our own root) is this very file."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def install(self, pod_conf: str) -> None:
        """Make the file say `pod_conf`. A dead attach's record of this inode is taken over, so the
        original it saved is what comes back; Busy while that attach still runs."""
        left = _load(self.state)
        if left is not None and _owner_alive(left) and left["owner"][0] != os.getpid():
            raise Busy(f"another attach (process {left['owner'][0]}) has rewritten {self.place.path}")
        if left is not None:  # a sidecar's earlier round of ours counts as dead: it ended
            record = left | {"root": self.place.root, "path": self.place.path}
        else:
            before = None if self.made else rootfs.read_capped(self.fd, MAX_BYTES, self.place.path)
            record = {"root": self.place.root, "path": self.place.path, "dev": self.ident[0],
                      "ino": self.ident[1], "made_dir": self.made_dir,
                      "original": None if before is None else base64.b64encode(before).decode()}
        record["owner"] = [os.getpid(), _starttime(os.getpid())]
        _save(self.state, record)
        self.record, self.written = record, True
        _overwrite(self.fd, (HEADER + pod_conf.rstrip("\n") + "\n").encode())

    def restore(self) -> None:
        """Put back what `install` (or the dead attach before it) recorded, then forget the record."""
        if self.record is None:
            return
        original = self.record["original"]
        if original is None:
            self._remove(self.record["made_dir"])
        else:
            _overwrite(self.fd, base64.b64decode(original))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state)
        self.record = None

    def _remove(self, made_dir: bool) -> None:
        """Unlink the file we made, if its name (looked up in the root again) is still this inode."""
        parent, name = os.path.split(self.place.path)
        with contextlib.suppress(FileNotFoundError):
            dir_fd = rootfs.openat2(self.root_fd, parent, os.O_PATH | os.O_DIRECTORY)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self.ident:
                    os.unlink(name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        if made_dir and self.place.root == "/":
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep it
                os.rmdir(parent)

    def close(self) -> None:
        """Let go of the file; one we made and then did not use (DNS left alone after all) goes again."""
        if self.made and not self.written:
            self._remove(self.made_dir)
        os.close(self.fd)
        os.close(self.root_fd)


def restore_leftovers(warn: Callable[[str], None]) -> list[str]:
    """Resolver files of killed attaches given their original back (for `mirrord-ns cleanup`), as
    "removed ..." items. A record whose file is gone, or is no longer that inode, is dropped: there
    is nothing left to restore. One that cannot be applied now is kept, and `warn`ed about."""
    done = []
    try:
        names = sorted(n for n in os.listdir(STATE_DIR) if n.startswith("resolv.") and n.endswith(".json"))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(STATE_DIR, name)
        record = _load(path)
        if record is None or _owner_alive(record):
            continue
        place = Place(record["root"], record["path"], record["made_dir"])
        where = f"{place.path} in {place.root}"
        try:
            held = Held.open(place, create=False)
        except OSError:
            held = None
        try:
            if held is None or held.ident != (record["dev"], record["ino"]):
                os.unlink(path)
                done.append(f"the record of a killed attach's {where} (that file is gone)")
            else:
                held.record = record
                held.restore()
                done.append(f"the pod's resolver from {where} (its original is back)")
        except OSError as e:
            warn(f"cannot restore {where}: {e}")
        finally:
            if held is not None:
                held.close()
    return done
