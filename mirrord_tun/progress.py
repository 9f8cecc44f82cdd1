"""The status line: one line on stderr, rewritten in place through the slow steps of a start.

Only on a terminal: a pipe or a log file gets none of it (the steps are log lines at -v).
The line is gone before the command starts, since from then on the terminal is the
command's; a log record printed meanwhile first clears it, so the two never share a line.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PROG = "mirrord-ns"
_CLEAR = "\r\x1b[K"  # to the line's start, erase to its end


def terminal_safe(text: str) -> str:
    """Text that the cluster, a container or the agent chose (events, log lines, reasons), for the
    terminal: every character that is not printable (escape sequences, carriage returns) as "?"."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


class SafeFormatter(logging.Formatter):
    """Our log lines carry such text: an event's message could retitle or clear the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


class Progress:
    """`step(text)` shows text as the line; `clear()` removes it. Silent without a stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._shown: str | None = None
        if stream is not None:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._before_log)

    @classmethod
    def on_stderr(cls, quiet: bool = False) -> "Progress":
        return cls(None if quiet or not sys.stderr.isatty() else sys.stderr)

    def step(self, text: str) -> None:
        if self.stream is None or text == self._shown:
            return
        line = f"{PROG}: {terminal_safe(text).replace(chr(10), ' ')}"
        # A line that wraps cannot be erased by _CLEAR (it only reaches the last row).
        self.stream.write(_CLEAR + line[:max(self._columns() - 1, 20)])
        self.stream.flush()
        self._shown = text

    def clear(self) -> None:
        if self.stream is not None and self._shown is not None:
            self.stream.write(_CLEAR)
            self.stream.flush()
        self._shown = None

    def close(self) -> None:
        self.clear()
        if self.stream is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._before_log)
            self.stream = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _before_log(self, _record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns if self.stream else 0
        except (OSError, ValueError):
            columns = 0
        return columns or 80  # 0: a terminal that never said its size


QUIET = Progress()  # for callers that show nothing
