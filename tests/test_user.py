"""The README's user: someone with sudo, whose command runs as themselves, who closes terminals.

The command is dropped to `nobody` (65534) as `sudo` would have it, and must still reach
the cluster by TCP, UDP, DNS and ICMP. `demo` must leave nothing when its terminal goes
away; `cleanup` must remove what a killed `demo` left and never what a live one holds;
and no child may pick up a `mirrord_tun` folder from the current directory.
"""
from __future__ import annotations

import os
import pty
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from conftest import (CLEAN_TIMEOUT, POD, RUN_TIMEOUT, SVC, UDP_ECHO_PORT, Cluster, children, mrd_run,
                      pid_alive, run_env, wait_until)
from mirrord_tun.sandbox import DOMAIN, OWNER_FILE, PREFIX, Sandbox

ROLES = ("node", "pod", "svc", "dns", "client", "laptop")
NOBODY = run_env(SUDO_UID="65534", SUDO_GID="65534", SUDO_USER="nobody")
CLI = [sys.executable, "-P", "-m", "mirrord_tun"]
DEMO_TIMEOUT = 120
# Clients run by Debian's /usr/bin/python3, which nobody may execute (the venv may be private).
UDP_ROUNDTRIP = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
                 f"s.sendto(b'as nobody', ('{SVC}', {UDP_ECHO_PORT})); print(s.recvfrom(100)[0].decode())")
ICMP_ECHO = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); "
             f"s.settimeout(5); s.sendto(bytes([8, 0, 0, 0, 0, 0, 0, 1]) + b'mirrord-ns', ('{SVC}', 0)); "
             f"r = s.recv(100); print('echo reply from svc' if r[0] == 0 and r[8:] == b'mirrord-ns' else r)")


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


# --- the command as the invoking user

def test_icmp_echo_socket_as_the_sudo_user(cluster: Cluster, nobody_identity: None) -> None:
    """What an unprivileged ping uses: an ICMP datagram socket, allowed by ping_group_range."""
    out = ok(mrd_run(cluster.sb, "sh", "-c", f"id -u; cat /proc/sys/net/ipv4/ping_group_range; "
                     f"/usr/bin/python3 -c \"{ICMP_ECHO}\"", env=NOBODY))
    uid, groups, reply = out.splitlines()
    assert uid == "65534" and groups.split() == ["0", "2147483647"]
    assert reply == "echo reply from svc"


@pytest.mark.skipif(not shutil.which("ping"), reason="iputils-ping is not installed (scripts/install adds it)")
def test_ping_as_the_sudo_user(cluster: Cluster, nobody_identity: None) -> None:
    out = ok(mrd_run(cluster.sb, "sh", "-c", "id -u; ping -c 1 -W 5 svc", env=NOBODY))
    assert out.splitlines()[0] == "65534"
    assert "1 received" in out


def test_tcp_udp_dns_as_the_sudo_user(cluster: Cluster, nobody_identity: None) -> None:
    out = ok(mrd_run(cluster.sb, "sh", "-c", f"id -u; getent hosts svc; curl -sS --max-time 10 http://{SVC}/; "
                     f"/usr/bin/python3 -c \"{UDP_ROUNDTRIP}\"", env=NOBODY))
    uid, host, http, udp = out.splitlines()
    assert uid == "65534"
    assert host.split() == [SVC, f"svc.{DOMAIN}"]
    assert http == f"hello from svc, you are {POD}"
    assert udp == "as nobody"


def _demo_user() -> dict[str, str]:
    """nobody, where nobody may run this venv's Python (the demo's laptop programs do, as the
    user); else the clone's owner, as in real use, where a clone in a 0700 home is its owner's."""
    try:
        if subprocess.run([*CLI, "--version"], user=65534, group=65534, capture_output=True).returncode == 0:
            return NOBODY
    except PermissionError:  # the venv's python is behind a folder nobody may enter
        pass
    owner = os.stat(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if owner.st_uid == 0:
        pytest.skip("only root may enter this clone: clone it where another user may run its .venv")
    return run_env(SUDO_UID=str(owner.st_uid), SUDO_GID=str(owner.st_gid), SUDO_USER=pwd.getpwuid(owner.st_uid).pw_name)


def test_demo_tour_as_the_sudo_user() -> None:
    """The README's first command, as a person runs it: curl, getent and ping as themselves."""
    r = subprocess.run([*CLI, "demo"], env=_demo_user(), capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "exit status 0" in r.stderr and ", 0% packet loss" in r.stdout
    # The mirror's copy comes from the cluster client, and the steal routes by the header.
    assert "the laptop program got a copy: 9 bytes from 198.18.0.30" in r.stderr, r.stderr
    assert "with the header:    hello from laptop" in r.stderr, r.stderr


# --- leave nothing

def _sandbox_of(pid: int) -> str | None:
    """The prefix of the sandbox whose owner file names `pid` (other tests' sandboxes run too)."""
    tmp = tempfile.gettempdir()
    for d in os.listdir(tmp):
        if d.startswith(PREFIX):
            try:
                with open(os.path.join(tmp, d, OWNER_FILE)) as f:
                    if f.read().split()[0] == str(pid):
                        return d.split(".", 1)[0]
            except (OSError, IndexError):
                continue
    return None


def _traces(prefix: str) -> list[str]:
    """What a sandbox leaves on the host: named namespaces, /etc/netns dirs, its temp dir (keys)."""
    tmp = tempfile.gettempdir()
    found = [f"/run/netns/{n}" for n in _listdir("/run/netns") if n.startswith(prefix + "-")]
    found += [f"/etc/netns/{n}" for n in _listdir("/etc/netns") if n.startswith(prefix + "-")]
    found += [os.path.join(tmp, d) for d in os.listdir(tmp) if d.startswith(prefix + ".")]
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _descendants(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        out += [child, *_descendants(child)]
    return out


def _runs(pid: int, argv: list[str]) -> bool:
    """Some descendant of `pid` runs exactly `argv` (the command inside `run`)."""
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == [a.encode() for a in argv]:
                    return True
        except OSError:
            pass
    return False


def _cleanup_after(pid: int) -> None:
    """A failed test may leave the demo's sandbox: its owner is dead by now, so cleanup takes it."""
    subprocess.run([*CLI, "cleanup", "--kubeconfig", "/nonexistent"], capture_output=True, timeout=60)


def test_closing_the_terminal_of_demo_leaves_nothing() -> None:
    master, slave = pty.openpty()
    # `setsid --ctty`: demo leads a session whose controlling terminal is the pty, as in a window.
    p = subprocess.Popen(["setsid", "--ctty", *CLI, "demo", "--", "sleep", "60"],
                         stdin=slave, stdout=slave, stderr=slave, env=run_env())
    os.close(slave)
    try:
        started = wait_until(lambda: _runs(p.pid, ["sleep", "60"]) or not pid_alive(p.pid), DEMO_TIMEOUT)
        output = b""
        while select.select([master], [], [], 0)[0]:
            output += os.read(master, 65536)
        assert started and pid_alive(p.pid), f"demo never ran its command: {output.decode(errors='replace')}"
        prefix = _sandbox_of(p.pid)
        assert prefix and _traces(prefix), "no sandbox found for the demo"
        os.close(master)  # the window closes: the kernel hangs up the terminal
        master = -1
        assert p.wait(RUN_TIMEOUT) >= 0, "demo died of the hangup instead of cleaning up"
        assert _traces(prefix) == []
    finally:
        if master >= 0:
            os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
            _cleanup_after(p.pid)


def test_sigint_from_a_script_reaches_the_demos_command() -> None:
    """`kill -INT` without a terminal: nobody else sent it to the command, so demo passes it on."""
    p = subprocess.Popen([*CLI, "demo", "--", "sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=run_env())
    try:
        assert wait_until(lambda: _runs(p.pid, ["sleep", "60"]) or p.poll() is not None, DEMO_TIMEOUT)
        prefix = _sandbox_of(p.pid)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=RUN_TIMEOUT)
        assert p.returncode == 128 + signal.SIGINT, err
        assert prefix and _traces(prefix) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
            _cleanup_after(p.pid)


@pytest.mark.parametrize("when", ["its-directory", "its-first-namespace"])
def test_sigterm_while_demo_builds_its_sandbox_leaves_nothing(when: str) -> None:
    """SIGTERM once the sandbox's directory exists, or as soon as its first namespace appears:
    then `ip netns add` is usually still running, and what it made must not be lost."""
    p = subprocess.Popen([*CLI, "demo", "--", "sleep", "60"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=run_env())
    try:
        assert wait_until(lambda: _sandbox_of(p.pid) is not None or p.poll() is not None, DEMO_TIMEOUT)
        prefix = _sandbox_of(p.pid)
        assert prefix, "demo made no sandbox"
        if when == "its-first-namespace":
            made = lambda: any(t.startswith("/run/netns/") for t in _traces(prefix))  # noqa: E731
            assert wait_until(lambda: made() or p.poll() is not None, DEMO_TIMEOUT, 0.001)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=RUN_TIMEOUT)
        assert p.returncode == 130, err
        assert "Traceback" not in err.decode()
        assert _traces(prefix) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
            _cleanup_after(p.pid)


def test_cleanup_removes_a_dead_demos_sandbox_but_not_a_live_one() -> None:
    dead, live = Sandbox(), Sandbox()
    try:
        dead.build()
        live.build()
        # The dead one's owner: a process that has exited (its PID, a start time no process has).
        gone = subprocess.Popen(["true"])
        gone.wait()
        with open(os.path.join(dead.dir, OWNER_FILE), "w") as f:
            f.write(f"{gone.pid} 0\n")
        orphan = dead.start("node", ["sleep", "300"])  # what a killed demo's agent would be
        r = subprocess.run([*CLI, "cleanup", "--kubeconfig", "/nonexistent"], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert f"removed sandbox dir {dead.dir}" in r.stdout
        assert _traces(dead.prefix) == []
        assert orphan.wait(CLEAN_TIMEOUT) != 0
        assert sorted(_traces(live.prefix)) == sorted(
            [*(live.netns_path(role) for role in ROLES), f"/etc/netns/{live.ns('pod')}", live.dir])
        assert live.exec("pod", "true").returncode == 0
    finally:
        dead.close()
        live.close()


def test_children_ignore_a_mirrord_tun_folder_in_the_current_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """From a source tree with a non-editable install, `-m mirrord_tun` would pick up the folder."""
    bogus = tmp_path / "mirrord_tun"
    bogus.mkdir()
    (bogus / "__init__.py").write_text("raise SystemExit('imported the mirrord_tun folder of the cwd')\n")
    (bogus / "__main__.py").write_text("raise SystemExit('imported the mirrord_tun folder of the cwd')\n")
    installed = os.path.join(os.path.dirname(sys.executable), "mirrord-ns")  # as a person runs it
    r = subprocess.run([installed, "demo", "--", "true"], cwd=tmp_path, env=run_env(), capture_output=True,
                       text=True, timeout=DEMO_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "cwd" not in r.stderr
