"""Who owns a piece of kernel state: a PID plus its start time, so a reused PID is not mistaken for the owner."""
from __future__ import annotations

import os


def start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22 (starttime), counted after the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def me() -> str:
    pid = os.getpid()
    return f"{pid}:{start_time(pid)}"


def alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return pid.isdigit() and start_time(int(pid)) == start
