"""Stop signals during blocking setup, as KeyboardInterrupt, without losing one.

Setup that is plain blocking code (demo building its sandbox, `run -t` starting the agent
pod) turns a stop signal into KeyboardInterrupt so that its `finally` blocks clean up. But
Python runs a handler between any two bytecodes of the main thread, and when those belong
to a __del__ (every subprocess.Popen has one) the exception is printed as "Exception
ignored" and lost: setup went on and started the command, and SIGTERM did nothing (seen in
CI). So the signal is also remembered, the lost exception is not printed, and setup calls
check() between its steps, which raises it again. After the first signal the others are
ignored until the block ends: cleanup must not be cut short by a second one.

Once an event loop runs, a raised KeyboardInterrupt would land inside the loop's own code:
`until_stopped` hands the signals to the loop instead, where one cancels the work (its
cleanup runs as tasks' does), as asyncio.run does with Ctrl-C.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import FrameType
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


class Interrupts:
    """`with Interrupts(sigs) as stop:` ... `stop.check()` between steps. `divert(sig)` may
    take a signal instead (return True), e.g. to pass it on to a child doing the work."""

    def __init__(self, signals: tuple[int, ...], divert: Callable[[int], bool] | None = None) -> None:
        self.signals = signals
        self.received: int | None = None
        self._divert = divert
        self._previous: dict[int, Any] = {}
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> "Interrupts":
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._drop_lost_interrupt
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self._unraisable

    def check(self) -> None:
        """Raise the interrupt again if a signal came and its exception was lost."""
        if self.received is not None:
            raise KeyboardInterrupt

    async def until_stopped(self, work: Awaitable[T]) -> T:
        """`work` in the running loop; a stop signal cancels it, then raises KeyboardInterrupt.
        Handlers `work` adds for the same signals (a command's forwarding) take over meanwhile."""
        self.check()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)

        def stop(sig: int) -> None:
            if self.received is None:  # a second one must not cancel the cleanup
                self.received = sig
                task.cancel()
        before = {sig: signal.getsignal(sig) for sig in self.signals}
        for sig in self.signals:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await task
        except asyncio.CancelledError:
            if self.received is None:
                raise
            raise KeyboardInterrupt from None
        finally:
            for sig, handler in before.items():
                loop.remove_signal_handler(sig)  # leaves SIG_DFL: what was there again, or held
                signal.signal(sig, handler if self.received is None else signal.SIG_IGN)

    def hold(self) -> None:
        """From here on no signal may cut the cleanup short."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, sig: int, _frame: FrameType | None) -> None:
        if self.received is not None:  # held: an inner block put this handler back after its cleanup
            return
        if self._divert and self._divert(sig):
            return
        self.received = sig
        self.hold()
        raise KeyboardInterrupt

    def _drop_lost_interrupt(self, unraisable: Any) -> None:
        # Ours, lost in a __del__: check() raises it where it can be handled. Anything else as before.
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received is not None):
            self._unraisable(unraisable)


def terminal_foreground() -> bool:
    """Whether we are the terminal's foreground job: then a typed ^C or ^\\ reached our children too."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False
