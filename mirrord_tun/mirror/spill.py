"""Bytes of one mirrored connection that the local program has not taken yet.

A program under a debugger, or merely slower than the pod, must not cost the
copy its connection: what it does not take waits here, in order. The first
MEMORY_CAP bytes stay in memory (while all spills of the session together hold
less than TOTAL_MEMORY_CAP there); past that, everything goes to a temporary file
(until the file is drained, so order is kept), so `run`'s memory stays small
however far behind the program falls. The file has no name: it is made with
O_TMPFILE (or mkstemp and unlinked at once) in SPILL_DIR, a root-owned 0700
directory on disk (/var/tmp, not /run, which is tmpfs, i.e. memory), so it
vanishes with its descriptor, even if `run` is killed.
"""
from __future__ import annotations

import os
import stat
import tempfile

MEMORY_CAP = 1024 * 1024
TOTAL_MEMORY_CAP = 8 * 1024 * 1024  # keeps `run` within its RSS target (80 MiB) however many connections lag
SPILL_DIR = "/var/tmp/mirrord-ns"


def _spill_dir() -> str:
    """SPILL_DIR, made if missing; refused unless it is a real directory only root can enter."""
    os.makedirs(SPILL_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(SPILL_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise OSError(f"{SPILL_DIR}: not a root-owned 0700 directory")
    return SPILL_DIR


def _anonymous_file() -> int:
    directory = _spill_dir()
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:  # a filesystem without O_TMPFILE
        fd, path = tempfile.mkstemp(dir=directory)
        os.unlink(path)
        return fd


class SpillTotals:
    """What the spills of one session hold together: in memory, and in all."""

    def __init__(self) -> None:
        self.memory = 0
        self.waiting = 0


class Spill:
    """A FIFO of bytes: memory first, then an unnamed file; `len()` is what waits."""

    def __init__(self, totals: SpillTotals) -> None:
        self._totals = totals
        self._mem = bytearray()
        self._fd: int | None = None
        self._read = 0  # file offsets: next byte to give out, next byte to write
        self._write = 0
        self.filed = 0  # bytes that ever went to the file

    def __len__(self) -> int:
        return len(self._mem) + self._write - self._read

    def push(self, data: bytes) -> None:
        if (self._write == self._read and len(self._mem) + len(data) <= MEMORY_CAP
                and self._totals.memory + len(data) <= TOTAL_MEMORY_CAP):
            self._mem += data
            self._totals.memory += len(data)
            self._totals.waiting += len(data)
            return
        if self._fd is None:
            self._fd = _anonymous_file()
        done = 0
        while done < len(data):  # pwrite may write less than asked
            done += os.pwrite(self._fd, memoryview(data)[done:], self._write + done)
        self._write += len(data)
        self.filed += len(data)
        self._totals.waiting += len(data)

    def pop(self, limit: int) -> bytes:
        """Up to `limit` of the oldest bytes (memory holds older bytes than the file)."""
        if self._mem:
            out = bytes(self._mem[:limit])
            del self._mem[:limit]
            self._totals.memory -= len(out)
            self._totals.waiting -= len(out)
            return out
        if self._fd is None or self._read == self._write:
            return b""
        out = os.pread(self._fd, min(limit, self._write - self._read), self._read)
        self._read += len(out)
        self._totals.waiting -= len(out)
        if self._read == self._write:  # drained: give the disk space back, start over
            os.ftruncate(self._fd, 0)
            self._read = self._write = 0
        return out

    def close(self) -> None:
        self._totals.memory -= len(self._mem)
        self._totals.waiting -= len(self)
        self._mem = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._read = self._write = 0
