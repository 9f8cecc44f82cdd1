"""sshstart: asyncssh's start-up library lookups, the same answers without the processes, and no X.509."""
from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from mirrord_tun import sshstart


@pytest.mark.parametrize("name", ["c", "m", "z", "nettle", "oqs", "liboqs"])
def test_same_answer_as_ctypes(name: str) -> None:
    assert sshstart.find_in_loader_dirs(name) == ctypes.util.find_library(name)


def test_ld_library_path_first(tmp_path, monkeypatch) -> None:
    (tmp_path / "libmrdfake.so").write_bytes(b"")  # the development link: not loadable by name
    (tmp_path / "libmrdfake.so.3.1").write_bytes(b"")
    (tmp_path / "libmrdfake.so.3").write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{tmp_path}")
    assert sshstart.find_in_loader_dirs("mrdfake") == "libmrdfake.so.3"


# asyncssh imported after install() starts no process (ctypes starts ldconfig, gcc
# and ld through subprocess.Popen) and loads no X.509 code; other names still go to ctypes' own lookup.
_PROBE = """
import subprocess, ctypes.util
started = []
class Recorder(subprocess.Popen):
    def __init__(self, args, *a, **kw):
        started.append(args)
        super().__init__(args, *a, **kw)
subprocess.Popen = Recorder
from mirrord_tun import sshstart
sshstart.install()
import asyncssh, sys
assert not started, started
assert "cryptography.x509" not in sys.modules, "asyncssh loaded its X.509 support"
ctypes.util.find_library("mrd-no-such-library")
assert started, "other names go to ctypes"
"""


def test_imports_start_no_process() -> None:
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
