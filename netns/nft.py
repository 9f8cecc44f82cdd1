"""nftables through the `nft` binary, in the calling thread's namespace.

A child process inherits the namespaces of the thread that forks it, so calling
these from a `NetNs` thread configures that namespace.
"""
from __future__ import annotations

import re
import subprocess


class NftError(RuntimeError):
    pass


def run(script: str) -> None:
    """Apply an nft script atomically (one transaction)."""
    p = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if p.returncode != 0:
        raise NftError(f"nft failed: {p.stderr.strip()}")


def tables(family: str, prefix: str) -> dict[str, str]:
    """Tables of `family` whose name starts with `prefix`, mapped to their comment."""
    # `nft -j` (1.0.6) leaves table comments out, so read the text form.
    p = subprocess.run(["nft", "list", "ruleset", family], capture_output=True, text=True)
    if p.returncode != 0:
        raise NftError(f"nft failed: {p.stderr.strip()}")
    pattern = rf'^table {family} ({re.escape(prefix)}\S*) {{\n(?:\s*comment "([^"]*)")?'
    return {m[1]: m[2] or "" for m in re.finditer(pattern, p.stdout, re.M)}


def delete_table(family: str, name: str) -> None:
    """Delete a table if it exists (declaring it first makes this idempotent)."""
    run(f"table {family} {name}\ndelete table {family} {name}\n")
