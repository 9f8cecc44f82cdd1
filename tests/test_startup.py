"""Where `run`'s start-up goes (MIRRORD_NS_TIMING=1) and the exit that skips the interpreter's
teardown: the phases are said in order and only when asked, and the quick exit still runs the
atexit handlers, flushes what was printed and keeps the exit status."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Cluster, mrd_run, run_env

TIMING = "mirrord-ns: timing: "
RUN_PHASES = ["interpreter started", "command line imported", "options parsed", "session modules imported",
              "keys read", "SSH connected", "WELCOME received", "tunnel up", "inbound up", "command started",
              "command exited", "namespace reaped", "session closed", "exit"]


def mirrord_ns(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_NS_")}
    return subprocess.run([sys.executable, "-m", "mirrord_tun", *args], capture_output=True, text=True,
                          timeout=60, env={**clean, **env})


def phases(stderr: str) -> list[str]:
    return [line[len(TIMING):].partition(":")[0] for line in stderr.splitlines() if line.startswith(TIMING)]


def test_no_timing_lines_unless_asked() -> None:
    r = mirrord_ns("--version")
    assert r.returncode == 0 and TIMING not in r.stderr


def test_timing_lines_say_each_phase_with_wall_and_cpu_time() -> None:
    r = mirrord_ns("--version", MIRRORD_NS_TIMING="1")
    assert r.returncode == 0 and r.stdout.startswith("mirrord-ns, version")
    assert phases(r.stderr) == ["interpreter started", "command line imported", "exit"]
    for line in r.stderr.splitlines():
        assert line.startswith(TIMING) and line.endswith(" ms") and ", cpu " in line


def test_run_says_its_phases_in_order(cluster: Cluster) -> None:
    r = mrd_run(cluster.sb, "true", env=run_env(MIRRORD_NS_TIMING="1"))
    assert r.returncode == 0, r.stderr
    assert phases(r.stderr) == RUN_PHASES
    walls = [float(line.split(": ")[3].split()[0]) for line in r.stderr.splitlines() if line.startswith(TIMING)]
    assert walls == sorted(walls)


def test_the_quick_exit_runs_atexit_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    said = tmp_path / "atexit"
    script = ("import atexit, sys\n"
              f"atexit.register(lambda: open({str(said)!r}, 'w').write('ran'))\n"
              "from mirrord_tun.cli import console\n"
              "sys.argv[1:] = sys.argv[2:]\n"
              "console()\n")
    for args, code in ((["--version"], 0), (["run", "--no-such-option"], 2)):
        r = subprocess.run([sys.executable, "-c", script, "mirrord-ns", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == code, r.stderr
        assert said.read_text() == "ran"
        said.unlink()
        # Buffered output (a pipe, not a terminal) still arrives.
        assert (r.stdout if code == 0 else r.stderr).startswith("mirrord-ns")
