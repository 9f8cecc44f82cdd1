"""A user reads only our own words: no dependency's warning reaches the terminal.

cryptography 51 made asyncssh print ten lines of CryptographyDeprecationWarning at every import;
our entry points now send such warnings to the debug log (-vv). The commands run here with
warnings turned into errors for our own modules only (a deprecated call of ours fails the
test), and their stderr must hold no warning line at all.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import Cluster, run_env

# The entry point, with every warning attributed to a module of ours raised as an error.
STRICT = ("import sys, warnings; warnings.filterwarnings('error', module='mirrord_tun'); "
          "sys.argv[0] = 'mirrord-ns'; from mirrord_tun.cli import main; main()")
WARNING_LINE = re.compile(r"\b[A-Za-z]*Warning\b")
TIMEOUT = 120


def strict(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-P", "-c", STRICT, *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=run_env(), stdin=subprocess.DEVNULL)


def no_warning(r: subprocess.CompletedProcess[str]) -> None:
    assert not WARNING_LINE.search(r.stderr), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [("--help",), ("run", "--help"), ("ls", "--kubeconfig", "/nonexistent"),
                                  ("run", "--stel", "--", "true")])
def test_help_and_errors_carry_no_library_warning(args: tuple[str, ...]) -> None:
    no_warning(strict(*args))


def test_run_through_the_tunnel_carries_no_library_warning(cluster: Cluster) -> None:
    argv = cluster.sb.run_args("true")
    at = argv.index("-m")
    r = strict(*argv[at + 2:], prefix=tuple(argv[:at - 2]))  # `ip netns exec NS`, then our entry point
    assert r.returncode == 0, r.stderr
    no_warning(r)


def test_demo_carries_no_library_warning() -> None:
    r = strict("demo")
    assert r.returncode == 0, r.stderr
    no_warning(r)
    assert not WARNING_LINE.search(r.stdout), r.stdout


def test_library_warnings_are_there_with_debug_lines() -> None:
    """-vv shows what was held back, as debug lines of ours (here: any held warning is logged)."""
    script = ("import sys, warnings; sys.argv[0] = 'mirrord-ns'; from mirrord_tun import cli; "
              "warnings.warn_explicit('a library speaks', UserWarning, '/elsewhere/lib.py', 1); "
              "cli.main()")
    # `run` sets up logging, then fails at once on key files that hold no key.
    args = ["--agent", "198.18.0.1:9", "--identity", "/dev/null", "--agent-host-key", "/dev/null", "--", "true"]
    quiet, loud = (subprocess.run([sys.executable, "-P", "-c", script, "run", *v, *args], capture_output=True,
                                  text=True, timeout=TIMEOUT, env=run_env()) for v in ([], ["-vv"]))
    assert "a library speaks" not in quiet.stderr
    assert "UserWarning from /elsewhere/lib.py:1: a library speaks" in loud.stderr, loud.stderr
