"""The packet path in C (_datapath.c), when it was built from this very source; else None, and
pump.py and sshfast.py run their own Python, the reference the C follows.

MIRRORD_NS_NATIVE=0 turns it off (A/B runs, ruling it out when debugging); read once, at import.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("MIRRORD_NS_NATIVE", "1") == "0":
        return None
    try:
        from mirrord_tun import _datapath
    except ImportError:  # not built: no compiler or headers where it was installed
        return None
    # Next to its source (a clone, installed editable), the extension must have been built from it:
    # after a `git pull` that changed the C, an older build would run old code until reinstalled.
    source = Path(__file__).with_name("_datapath.c")
    if source.exists() and getattr(_datapath, "SOURCE_SHA256", None) != hashlib.sha256(source.read_bytes()).hexdigest():
        return None
    return _datapath


datapath = _load()
LANGUAGE = "C" if datapath is not None else "Python"  # what the session's first log line says
