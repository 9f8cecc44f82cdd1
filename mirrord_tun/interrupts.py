"""Stop signals during blocking setup, as KeyboardInterrupt, without losing one.

Setup that is plain blocking code (demo building its sandbox, `run -t` starting the agent
pod) turns a stop signal into KeyboardInterrupt so that its `finally` blocks clean up. But
Python runs a handler between any two bytecodes of the main thread, and when those belong
to a __del__ (every subprocess.Popen has one) the exception is printed as "Exception
ignored" and lost: setup went on and started the command, and SIGTERM did nothing (seen in
CI). So the signal is also remembered, the lost exception is not printed, and setup calls
check() between its steps, which raises it again. After the first signal the others are
ignored until the block ends: cleanup must not be cut short by a second one.
"""
from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any, Callable


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

    def hold(self) -> None:
        """From here on no signal may cut the cleanup short."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, sig: int, _frame: FrameType | None) -> None:
        if self._divert and self._divert(sig):
            return
        self.received = sig
        self.hold()
        raise KeyboardInterrupt

    def _drop_lost_interrupt(self, unraisable: Any) -> None:
        # Ours, lost in a __del__: check() raises it where it can be handled. Anything else as before.
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received is not None):
            self._unraisable(unraisable)

