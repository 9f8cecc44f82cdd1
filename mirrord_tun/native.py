"""The packet path in C (_datapath.c, _gcm.c), when it was built from this very source; else None, and
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
    # The files and their order are setup.py's.
    sources = [Path(__file__).with_name(name) for name in ("_datapath.c", "_gcm.c", "_gcm.h")]
    if sources[0].exists() and getattr(_datapath, "SOURCE_SHA256", None) != hashlib.sha256(
            b"".join(path.read_bytes() for path in sources)).hexdigest():
        return None
    return _datapath


datapath = _load()


def describe() -> str:
    """The packet path, as the session's first log line says it."""
    if datapath is None:
        return "Python"
    return f"C, AES-GCM by {'libcrypto' if datapath.libcrypto() else 'cryptography'}"
