"""Dependencies' warnings stay off a user's terminal: they are logged at debug level (-vv).

A library's chatter (cryptography's "DSA is deprecated" through asyncssh, five times at every
import) would stand in front of our one-line errors. Only warnings raised from code outside our
own packages are redirected; ours keep Python's handling, so `-W error` still catches them.
Installed by the CLI before it imports any dependency; held until logging is set up.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import TextIO

log = logging.getLogger("mirrord-ns.libraries")
_HELD_AT_MOST = 100  # before logging is configured; a library that warns more is not worth more
_held: list[str] = []
_configured = False


def _our_roots() -> tuple[str, ...]:
    # agent/ and netns/ install under mirrord_tun, but an editable install maps them elsewhere.
    roots = []
    for name in ("mirrord_tun", "mirrord_tun.agent", "mirrord_tun.netns"):
        spec = importlib.util.find_spec(name)
        roots += [os.path.join(p, "") for p in (spec.submodule_search_locations or ())] if spec else []
    return tuple(roots)


def install() -> None:
    """Route warnings raised outside our packages to the debug log; keep ours as Python has them."""
    roots = _our_roots()
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if filename.startswith(roots):
            shown(message, category, filename, lineno, file, line)
            return
        text = f"{category.__name__} from {filename}:{lineno}: {message}"
        if _configured:
            log.debug("%s", text)
        elif len(_held) < _HELD_AT_MOST:
            _held.append(text)

    warnings.showwarning = show


def logging_ready() -> None:
    """Logging is configured: what was held goes to the debug log (shown with -vv)."""
    global _configured
    _configured = True
    for text in _held:
        log.debug("%s", text)
    _held.clear()
