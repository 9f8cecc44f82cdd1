"""The agent's two keys: its host key and the one client key it lets in.

A launcher starts the agent in a pod with neither file: the client's public key
comes inline in the pod spec, and the host key is made fresh at start and
published (public half only) in the log line the launcher pins.
"""
from __future__ import annotations

import asyncssh


def host_key(path: str | None) -> asyncssh.SSHKey:
    if path is None:
        return asyncssh.generate_private_key("ssh-ed25519")
    return asyncssh.read_private_key(path)


def authorized(path: str | None, data: str | None) -> asyncssh.SSHAuthorizedKeys:
    """Exactly one source: a file or the key text itself."""
    if (path is None) == (data is None):
        raise ValueError("give exactly one of --authorized-key FILE and --authorized-key-data KEY")
    if path is not None:
        with open(path) as f:
            text = f.read()
    else:
        text = data or ""
    try:
        return asyncssh.import_authorized_keys(text)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ValueError(f"bad authorized key: {e}") from None
