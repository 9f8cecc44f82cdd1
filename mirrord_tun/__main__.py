"""The `mirrord-ns` command: its console script and `python -m mirrord_tun` (children of `demo`
and the tests start it so).

Importing the command line and its libraries takes a fifth of a second before `cli` has any
handler of its own: a Ctrl-C there printed a KeyboardInterrupt traceback, and a SIGTERM or
SIGHUP killed the process by the signal (status 143 or 129), where every stop before the
command started is a quiet 130. Nothing exists yet that needs cleaning up, so during the
import a stop signal only ends the process with 130. From then on each is KeyboardInterrupt,
as Ctrl-C always was: `cli` cleans up on its way out and says 130, and SIGTERM and SIGHUP get
`cli`'s own handlers (Interrupts) a moment later; one that lands in between, before `cli`
catches anything, is still a quiet 130 here. A signal the caller ignores (nohup, a background
job's SIGINT) stays ignored.
"""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import NoReturn

_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stopped(_sig: int, _frame: FrameType | None) -> None:
    os._exit(130)


def console() -> NoReturn:
    stops = [sig for sig in _STOPS if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)]
    for sig in stops:
        signal.signal(sig, _stopped)
    from mirrord_tun import cli

    try:
        for sig in stops:
            signal.signal(sig, signal.default_int_handler)
        cli.console()
    except KeyboardInterrupt:  # what cleanup there was ran on the way here
        os._exit(130)


if __name__ == "__main__":
    console()
