"""What makes `run` start and end sooner, kept honest: where the time goes (MIRRORD_NS_TIMING=1,
phases said in order and only when asked); the exit that skips the interpreter's teardown
(the atexit handlers still run, output is flushed, the status kept); and the TUN left to
`run`'s own namespace at the end, which must vanish with it and never land in this one."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Cluster, mrd_run, run_env
from mirrord_tun.netns.links import has_link
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns.tun import Tun

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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)")
def test_a_tun_left_to_its_namespace_goes_with_it() -> None:
    name = f"mrdt{secrets.token_hex(3)}"
    ns = NetNs.new()
    try:
        tun = ns.call(Tun, name)
        ns.call(tun.close, True)
        # The device outlives its fd (the close did not wait for its removal)...
        assert ns.call(has_link, name)
    finally:
        ns.close()
    # ...and goes with the namespace: the kernel removes it in the background rather than
    # handing it to this namespace, as it does with physical devices. Watched for a while.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert not has_link(name)
        time.sleep(0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)")
def test_in_a_namespace_we_joined_the_tun_is_removed_at_close() -> None:
    """`attach` joins a namespace that outlives the session: nothing may be left to it there."""
    name = f"mrdt{secrets.token_hex(3)}"
    made = NetNs.new()
    try:
        joined = NetNs.open(f"/proc/self/fd/{made.fd}")
        try:
            assert made.private and not joined.private
            tun = joined.call(Tun, name)
            joined.call(tun.close, joined.private)
            assert not made.call(has_link, name)
        finally:
            joined.close()
    finally:
        made.close()


def test_a_plain_run_imports_no_steal_mount_or_config_file_code(tmp_path: Path) -> None:
    """Imported only when --steal, an --http-*-filter, --mount or -f asks for them (each costs
    `run -- true` milliseconds); checked up to where `run` reads its keys."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print(' '.join(sorted(sys.modules))))\n"
              "from mirrord_tun.cli import console\n"
              "sys.argv[1:] = sys.argv[2:]\n"
              "console()\n")
    missing = str(tmp_path / "missing")
    r = subprocess.run([sys.executable, "-c", script, "mirrord-ns", "run", "--agent", "198.18.0.1:2222",
                        "--identity", missing, "--agent-host-key", missing, "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read identity" in r.stderr
    loaded = set(r.stdout.split())
    assert "mirrord_tun.run" in loaded
    assert not loaded & {"mirrord_tun.stealer", "mirrord_tun.mounts", "mirrord_tun.sftprelay",
                         "mirrord_tun.agent.steal.filters", "tomllib", "difflib"}
