"""What root does with a file the invoking user named: read it, or write it private, with the user's rights.

Standard library only. Under sudo, asuser.py runs this very source in a child dropped to the
user (`python -I -S -c`), one JSON request on stdin and one JSON answer on stdout, so every
check is the kernel's for that user: a symlinked parent into a root-only directory, a root-owned
file, a hard link to one, none opens. Without sudo it is called in-process, as we are the user.
"""
import base64
import errno
import json
import os
import stat
import sys

MAX_FILE = 1 << 24  # a kubeconfig, a key or a config file is a few KiB; this only stops /dev/zero


def _error(e: OSError) -> dict:
    return {"errno": e.errno, "error": e.strerror or str(e)}


def read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return {"data": base64.b64encode(f.read(MAX_FILE)).decode()}
    except OSError as e:
        return _error(e)


def write_private(path: str, data: bytes) -> dict:
    """`path` holding `data`, mode 0600: a new file, or an existing regular file that is not a symlink."""
    try:
        # No O_TRUNC here: a FIFO or device named by mistake is refused before anything changes.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.fchmod(fd, 0o600)  # before the new content: it never sits in a readable file
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return {}
    except OSError as e:
        return _error(e)


def serve(request: dict) -> dict:
    """{"read": [paths]} -> {path: {"data": base64} or {"errno", "error"}};
    {"write": path, "data": base64} -> {} or {"errno", "error"}."""
    if "write" in request:
        return write_private(request["write"], base64.b64decode(request["data"]))
    return {path: read(path) for path in request["read"]}


if __name__ == "__main__":
    print(json.dumps(serve(json.load(sys.stdin))))
