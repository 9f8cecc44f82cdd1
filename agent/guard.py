"""The guard: a parent that outlives the agent worker and cleans up after it.

The worker can die in ways that run no `finally` (SIGKILL, the OOM killer); its
TUNs go with its fds, but nft tables and per-device forwarding stay. The guard forks the
worker before any thread exists, forwards termination signals to it, and when it
dies removes every table whose owner is no longer alive.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from mirrord_tun.agent import dataplane
from mirrord_tun.netns.namespace import NetNs

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_guarded(netns_path: str, worker: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = worker()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # reaped already: the sweep below is under way, and finishes

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 1 << 8
            break
        except InterruptedError:
            continue
    removed = sweep(netns_path)
    if removed:
        print(f"mirrord-ns agent: removed leftover {' '.join(removed)}", file=sys.stderr)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def sweep(netns_path: str) -> list[str]:
    """Remove what dead agents left in that namespace (also used by `mirrord-ns cleanup`)."""
    ns = NetNs.open(netns_path)
    try:
        return ns.call(dataplane.remove_leftovers)
    finally:
        ns.close()
