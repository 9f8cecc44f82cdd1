"""asyncssh's start-up without the work we never use: installed by the CLI before asyncssh is imported.

- Library lookups: at import, asyncssh looks for liboqs (post-quantum key exchange) and libnettle
  (UMAC) with ctypes.util.find_library, which on Linux runs `ldconfig -p` and, for each name it
  finds nothing for (liboqs, usually), gcc and then ld: seven processes here before `mirrord-ns`
  does anything (114 ms of a `run -- true` under strace, more under load). Those names are
  answered by looking where the dynamic loader looks; every other lookup is left to ctypes.
- X.509: asyncssh loads its X.509 certificate support when cryptography has it, and that import
  (cryptography.x509) was ~23 ms of CPU of every start, a tenth of `run -- true`. Both of our ends
  authenticate with pinned keys, never X.509 certificates, so asyncssh is imported as it is where
  cryptography lacks it: its own fallback (an ImportError it catches) turns the feature off.
"""
from __future__ import annotations

import ctypes.util
import functools
import glob
import os
import sys
import sysconfig

_ANSWERED = frozenset({"oqs", "liboqs", "nettle", "libnettle", "libnettle-6"})  # asyncssh/crypto/pq.py, umac.py
_LD_CONF = "/etc/ld.so.conf.d/*.conf"


def _loader_dirs() -> list[str]:
    """LD_LIBRARY_PATH, the loader's configured directories, then its defaults (with multiarch)."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for conf in sorted(glob.glob(_LD_CONF)):
        try:
            with open(conf) as f:
                dirs += [line.strip() for line in f if line.startswith("/")]
        except OSError:
            continue
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    for base in ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib"):
        dirs += [os.path.join(base, arch), base] if arch else [base]
    return dirs


def find_in_loader_dirs(name: str) -> str | None:
    """The file name of lib<name>.so.N (the loader's soname form) in the first directory holding
    one, as ctypes.CDLL takes it; None when there is none. A bare lib<name>.so is only the
    development link (for libc a linker script), which ctypes cannot load."""
    prefix = f"lib{name}.so."
    seen: set[str] = set()
    for d in _loader_dirs():
        real = os.path.realpath(d)  # /lib is often /usr/lib: list each directory once
        if real in seen:
            continue
        seen.add(real)
        found = [n for n in _libraries_in(real) if n.startswith(prefix) and n[len(prefix):][:1].isdigit()]
        if found:
            return min(found, key=len)
    return None


@functools.lru_cache(maxsize=64)
def _libraries_in(directory: str) -> tuple[str, ...]:
    """The lib* names in a directory, read once: asyncssh asks for three names, and reading
    /usr/lib/<arch> (a thousand entries) for each cost ~1.5 ms."""
    try:
        with os.scandir(directory) as entries:
            return tuple(e.name for e in entries if e.name.startswith("lib"))
    except OSError:
        return ()


_X509 = "asyncssh.crypto.x509"  # the one module that imports cryptography.x509


def install() -> None:
    # None in sys.modules makes an import raise ImportError; no effect once asyncssh is loaded.
    sys.modules.setdefault(_X509, None)
    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return find_in_loader_dirs(name) if name in _ANSWERED else original(name)

    ctypes.util.find_library = find_library
