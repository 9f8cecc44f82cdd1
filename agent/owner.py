"""Who owns a piece of kernel state: a PID plus its start time, so a reused PID is not mistaken for the owner."""
from __future__ import annotations

import os


def start_time(pid: int) -> str | None:
    """Start time of a live process; None if there is none (or only a zombie) with that PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields counted after the parenthesised command name, which may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    # A zombie is dead for us: its fds and TUNs are gone, and an orphan waits for a reaper
    # that may be slow or absent (PID 1 in a container), so its tables must not look owned.
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22, starttime


def me() -> str:
    pid = os.getpid()
    return f"{pid}:{start_time(pid)}"


def alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return pid.isdigit() and start_time(int(pid)) == start
