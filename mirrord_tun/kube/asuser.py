"""Files and commands the user behind sudo names: read, written and run with their rights.

A kubeconfig names files (its own path in KUBECONFIG, certificate-authority,
client-key, tokenFile) and commands (`users[].user.exec`: `aws eks get-token`,
`gke-gcloud-auth-plugin`). Under sudo those are the invoking user's choices, so
root must not act on them with its own rights: `client-key: /etc/shadow` would be
a confused deputy, and a plugin run as root would use root's HOME and caches.
Every such file (and `env -o FILE`, `--config`, `--identity`) is therefore read or
written by a short child process that runs as the user (`Popen(user=, group=,
extra_groups=)`, safe with threads alive; the file work itself is userfiles.py), and every
plugin runs as the user with the user's environment: the one sudo itself was
started with, read from the nearest `sudo` ancestor in /proc (the user's PATH,
AWS_PROFILE, CLOUDSDK_CONFIG...), else HOME/USER/LOGNAME and a plain PATH.
Without sudo we are the user, and read and run directly.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrord_tun.kube import userfiles
from mirrord_tun.netns.exec import User, invoking_user

# The child's program: userfiles.py's own source, so the same code runs with or without sudo.
_AS_USER = Path(userfiles.__file__).read_text()
# Standard library only: the base interpreter, which the user may run where a venv (root's) is private.
_PYTHON = getattr(sys, "_base_executable", None) or sys.executable
_SUDO_ANCESTORS = 8  # sudo, its pty monitor, `ip netns exec`...: a few levels at most


@dataclass(frozen=True)
class Principal:
    """Whom kubeconfig work is done for: ourselves (user None) or the user behind sudo."""

    user: User | None
    env: dict[str, str]  # the environment their credential plugins get

    def read(self, paths: list[str]) -> dict[str, bytes | OSError]:
        """Each file's content, or the OSError opening it raised, read with the user's rights."""
        out: dict[str, bytes | OSError] = {}
        for path, got in self._files({"read": paths}, ", ".join(paths), "read").items():
            out[path] = base64.b64decode(got["data"]) if "data" in got else OSError(got["errno"], got["error"], path)
        return out

    def write_private(self, path: str, data: bytes) -> None:
        """`path` holding `data`, mode 0600, written with the user's rights (never a symlink, never
        chowned after the fact: the user's own open makes it theirs). OSError if it cannot be."""
        got = self._files({"write": path, "data": base64.b64encode(data).decode()}, path, "write")
        if got:
            raise OSError(got["errno"], got["error"], path)

    def _files(self, request: dict[str, Any], what: str, verb: str) -> dict[str, Any]:
        """userfiles.serve(request), as the user: in a child dropped to them under sudo."""
        if self.user is None:
            return userfiles.serve(request)
        try:
            answer = self.run([_PYTHON, "-I", "-S", "-c", _AS_USER], self.env, input=json.dumps(request),
                              stderr=subprocess.PIPE, timeout=30)
            if answer.returncode != 0:
                raise OSError(answer.stderr.strip().splitlines()[-1:] or f"exit status {answer.returncode}")
            got: dict[str, Any] = json.loads(answer.stdout)
            return got
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            raise OSError(f"cannot {verb} {what} as {self.user.name}: {e}") from None

    def run(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """argv as the user (stdout captured as text); raises OSError like Popen."""
        who: dict[str, Any] = {}
        if self.user is not None:
            who = {"user": self.user.uid, "group": self.user.gid, "extra_groups": self.user.groups}
        return subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, close_fds=True, **who, **kwargs)


def principal() -> Principal:
    user = invoking_user()
    if user is None:
        return Principal(None, dict(os.environ))
    theirs = sudo_environment(user.uid)
    if theirs is None:
        theirs = {"PATH": f"{user.home}/.local/bin:/usr/local/bin:/usr/bin:/bin",
                  **{k: os.environ[k] for k in ("LANG", "LC_ALL", "TERM") if k in os.environ}}
    return Principal(user, dict(theirs, HOME=user.home, USER=user.name, LOGNAME=user.name))


def sudo_environment(uid: int | None = None) -> dict[str, str] | None:
    """The environment the nearest `sudo` ancestor was started with (what the user had before
    sudo's env_reset), if it was started by `uid` (any user when None) and we may read it."""
    pid = os.getppid()
    try:
        for _ in range(_SUDO_ANCESTORS):
            if pid <= 1:
                return None
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if comm == "sudo":
                if uid is not None and _real_uid(pid) != uid:
                    return None
                with open(f"/proc/{pid}/environ", "rb") as f:
                    raw = f.read()
                pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
                return {k: v for k, sep, v in pairs if sep}
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the (comm)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _real_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise ValueError("no Uid line")

