"""Where `run`'s start-up and teardown go: one stderr line per phase with MIRRORD_NS_TIMING=1.

Each line gives the wall time since this module was first imported (the CLI imports it before
any dependency, so after the interpreter's own start) and the process's CPU time so far, which
includes the interpreter's start: the figure that contention distorts least. scripts/bench's
`run -- true` line stays the measurement; this says which phase to look at.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "MIRRORD_NS_TIMING"
_ON = os.environ.get(ENV) == "1"
_START = time.perf_counter()


def mark(phase: str) -> None:
    """Say that `phase` is done (nothing unless MIRRORD_NS_TIMING=1)."""
    if _ON:
        wall, cpu = (time.perf_counter() - _START) * 1000, time.process_time() * 1000
        print(f"mirrord-ns: timing: {phase}: {wall:.1f} ms, cpu {cpu:.1f} ms", file=sys.stderr, flush=True)
