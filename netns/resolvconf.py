"""Give an existing namespace's programs the pod's resolver, and take it back.

A running container reads /etc/resolv.conf from its own file (Docker bind-mounts
one per container, and containers joined with `network_mode: service:X` share
X's). That file is rewritten in place — a bind-mounted file cannot be replaced
by rename — and the original lines travel inside it as comments, so restoring
needs no state of ours: a killed session's successor (or `restore`) finds them
there and puts them back.
"""
from __future__ import annotations

import contextlib
import os

MARK = "# mirrord-ns: the pod's resolver; the original follows as '#~' lines"
ORIG = "#~ "
ABSENT = "#~absent"  # the file did not exist: restoring removes it
NO_EOL = "#~noeol"  # its last line had no newline
MADE_DIR = "#~madedir"  # nor did its directory (/etc/netns/NAME): restoring removes that too


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    # In place (O_TRUNC, no rename) and never through a symlink: the path may lead
    # into a container whose absolute symlinks would resolve against our root.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def original(text: str | None) -> str | None:
    """The file as it was before us (None: absent), given what it holds now."""
    if text is None or not text.startswith(MARK):
        return text
    lines = text.splitlines()
    if ABSENT in lines:
        return None
    text = "".join(line[len(ORIG):] + "\n" for line in lines if line.startswith(ORIG))
    return text[:-1] if NO_EOL in lines else text


def install(path: str, pod_conf: str) -> None:
    """Make `path` say `pod_conf`, keeping what it said (also across a crashed session)."""
    now = _read(path)
    before = original(now)
    kept = [ABSENT] if before is None else [ORIG + line for line in before.splitlines()]
    if now is None and not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
        kept.append(MADE_DIR)
    elif now is not None and MADE_DIR in now.splitlines():
        kept.append(MADE_DIR)
    if before and not before.endswith("\n"):
        kept.append(NO_EOL)
    _write(path, "\n".join([MARK, pod_conf.rstrip("\n"), *kept]) + "\n")


def restore(path: str) -> bool:
    """Put the original back if we changed the file; True when there was something to undo."""
    now = _read(path)
    if now is None or not now.startswith(MARK):
        return False
    before = original(now)
    if before is None:
        os.unlink(path)
        if MADE_DIR in now.splitlines():
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep it
                os.rmdir(os.path.dirname(path))
    else:
        _write(path, before)
    return True
