"""nftables in the calling thread's namespace: libnftables in-process, the `nft` CLI as fallback.

Both act in the namespace of the thread that calls them, so calling these from a
`NetNs` thread configures that namespace: the library opens its netlink socket in
`nft_ctx_new`, which runs here in the calling thread (a fresh context per call, so
no socket ever outlives the call or serves another namespace), and a child
process inherits the namespaces of the thread that forks it.

In-process saves the fork and exec of `nft` on every session's start and end: a
call that changes no chain takes 0.1 ms against 2-5 ms for the binary here (adding or
deleting a chain or table waits about 16 ms in the kernel either way).
"""
from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import threading
from typing import Callable

_NETLINK_NETFILTER = 12


class NftError(RuntimeError):
    pass


class _Lib:
    """libnftables through ctypes (text commands, as `nft -f` reads them)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        # The library keeps process-wide state (one-time init, an interface cache filled
        # from whichever namespace asked last), so contexts never run concurrently.
        self._lock = threading.Lock()

    def command(self, command: str) -> str:
        """Run one line of nft commands; its output."""
        return self._call(self._lib.nft_run_cmd_from_buffer, command.encode())

    def script(self, script: str) -> None:
        """Run a script of many lines as one transaction."""
        # From a file, not a buffer: libnftables 1.0.6 quotes the first line of a buffer in
        # every error message, whichever line is wrong. A memfd is a file without a path.
        fd = os.memfd_create("nft", os.MFD_CLOEXEC)
        try:
            os.write(fd, script.encode())
            path = f"/proc/self/fd/{fd}"
            try:
                self._call(self._lib.nft_run_cmd_from_filename, path.encode())
            except NftError as e:  # errors start with the file's name and line
                raise NftError(str(e).replace(path, "script", 1)) from None
        finally:
            os.close(fd)

    def _call(self, fn: Callable[[int, bytes], int], arg: bytes) -> str:
        lib = self._lib
        with self._lock:
            ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the netlink socket, in this thread
            if not ctx:
                raise NftError("nft failed: cannot create a libnftables context")
            try:
                if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
                    raise NftError("nft failed: cannot buffer libnftables output")
                rc = fn(ctx, arg)
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                lib.nft_ctx_free(ctx)
        if rc != 0:
            raise NftError(f"nft failed: {err.strip() or f'error {rc}'}")
        return out


def _load() -> _Lib | None:
    try:
        lib = ctypes.CDLL("libnftables.so.1")
        # libnftables exit()s the whole process when it cannot open its netlink socket;
        # find that out here, and let the CLI report it as an error instead.
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER).close()
        return _Lib(lib)
    except (OSError, AttributeError):
        return None


# None: libnftables is missing (or unusable), so every call runs the `nft` binary.
_lib: _Lib | None = _load()


def _cli(argv: list[str], stdin: str | None = None) -> str:
    try:
        p = subprocess.run(["nft", *argv], input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise NftError("nft failed: neither libnftables.so.1 nor the nft command found "
                       "(install Debian's nftables package)") from None
    if p.returncode != 0:
        raise NftError(f"nft failed: {p.stderr.strip()}")
    return p.stdout


def run(script: str) -> None:
    """Apply an nft script atomically (one transaction)."""
    if _lib is not None:
        _lib.script(script)
    else:
        _cli(["-f", "-"], script)


def ruleset(family: str) -> str:
    """`nft list ruleset FAMILY`, as text."""
    command = f"list ruleset {family}"
    return _lib.command(command) if _lib is not None else _cli(command.split())


def tables(family: str, prefix: str) -> dict[str, str]:
    """Tables of `family` whose name starts with `prefix`, mapped to their comment."""
    # `nft -j` (1.0.6) leaves table comments out, so read the text form.
    listing = ruleset(family)
    pattern = rf'^table {family} ({re.escape(prefix)}\S*) {{\n(?:\s*comment "([^"]*)")?'
    return {m[1]: m[2] or "" for m in re.finditer(pattern, listing, re.M)}


def delete_table(family: str, name: str) -> None:
    """Delete a table if it exists (declaring it first makes this idempotent)."""
    run(f"table {family} {name}\ndelete table {family} {name}\n")
