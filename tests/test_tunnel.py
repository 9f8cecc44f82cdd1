"""`mirrord-ns run` end to end: real namespaces, the real agent, real clients.

All tests here share one cluster (session fixture) and leave the agent running.
"""
from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import asyncssh
import pytest

from conftest import (CLEAN_TIMEOUT, POD, RUN_TIMEOUT, SVC, UDP_ECHO_PORT, Cluster, assert_clean, children,
                      finish, kill_pids, leftovers, mrd_run, pid_alive, read_line, run_env, start_run, wait_until)
from mirrord_tun.netns.exec import COMMAND_PORTS
from mirrord_tun.sandbox import DOMAIN, Sandbox

TUNNEL_NET = ipaddress.ip_network("100.64.0.0/10")


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


# --- what must work through the tunnel

def test_curl_sees_the_pod_address(cluster: Cluster) -> None:
    out = ok(mrd_run(cluster.sb, "curl", "-sS", "--max-time", "10", f"http://{SVC}/"))
    assert out == f"hello from svc, you are {POD}\n"


def test_getent_resolves_through_the_pods_resolver_and_search_domains(cluster: Cluster) -> None:
    # "svc" is only known to the sandbox's DNS server, and only as svc.<search domain>.
    out = ok(mrd_run(cluster.sb, "getent", "hosts", "svc"))
    assert out.split() == [SVC, f"svc.{DOMAIN}"]


def test_resolv_conf_inside_the_command_is_the_pods(cluster: Cluster) -> None:
    pods = Path(f"/etc/netns/{cluster.sb.ns('pod')}/resolv.conf").read_text()
    assert ok(mrd_run(cluster.sb, "cat", "/etc/resolv.conf")) == pods


def test_busybox_ping(cluster: Cluster) -> None:
    out = ok(mrd_run(cluster.sb, "busybox", "ping", "-c", "2", "-W", "5", "svc"))
    assert "2 packets transmitted, 2 packets received" in out


def test_static_busybox_wget(cluster: Cluster) -> None:
    # Proves nothing depends on LD_PRELOAD: a static binary has no dynamic loader to hook.
    ldd = subprocess.run(["ldd", "/bin/busybox"], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    # No -T: this busybox build (1.35, Debian 12) segfaults on wget's timeout option.
    out = ok(mrd_run(cluster.sb, "/bin/busybox", "wget", "-q", "-O", "-", "http://svc/"))
    assert out == f"hello from svc, you are {POD}\n"


@pytest.mark.parametrize("size", [14, 1400, 8000])  # 8000: fragmented on the way and reassembled
def test_udp_echo(cluster: Cluster, size: int) -> None:
    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(2)\n"
        "data = bytes(range(256)) * (int(sys.argv[3]) // 256) + b'x' * (int(sys.argv[3]) % 256)\n"
        "for i in range(5):\n"  # a datagram may be lost; retry a few times
        "    s.sendto(data, (sys.argv[1], int(sys.argv[2])))\n"
        "    try:\n"
        "        print(s.recv(65535) == data); break\n"
        "    except socket.timeout:\n"
        "        pass\n"
    )
    out = ok(mrd_run(cluster.sb, sys.executable, "-c", client, SVC, str(UDP_ECHO_PORT), str(size)))
    assert out == "True\n"


def test_closed_ports_are_refused_not_silent(cluster: Cluster) -> None:
    # The TCP RST and the ICMP port-unreachable come back through the NAT and the tunnel.
    tcp = mrd_run(cluster.sb, "curl", "-sS", "--max-time", "20", f"http://{SVC}:81/")
    assert tcp.returncode == 7, tcp.stderr  # could not connect (a lost RST would be 28, timed out)
    udp = ("import socket, sys\n"
           "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "s.settimeout(20)\n"
           "s.connect((sys.argv[1], 9))\n"
           "s.send(b'anyone?')\n"
           "try:\n"
           "    s.recv(100)\n"
           "except ConnectionRefusedError:\n"
           "    print('refused')\n")
    assert ok(mrd_run(cluster.sb, sys.executable, "-c", udp, SVC)) == "refused\n"


# N connections one after the other, HTTP/1.0: the server closes first and keeps each in TIME_WAIT.
CONNECTIONS = ("import socket, sys\n"
               "ports = []\n"
               "for _ in range(int(sys.argv[2])):\n"
               "    with socket.create_connection((sys.argv[1], 80), timeout=10) as s:\n"
               "        ports.append(s.getsockname()[1])\n"
               "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
               "        while s.recv(65536):\n"
               "            pass\n"
               "print(min(ports), max(ports))\n")


def _tcp_ext(sb: Sandbox, role: str) -> dict[str, int]:
    """The TcpExt counters of one sandbox host's namespace."""
    lines = [line.split() for line in sb.exec(role, "cat", "/proc/net/netstat").stdout.splitlines()
             if line.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def _time_wait_ports(sb: Sandbox, role: str, peer: str) -> set[int]:
    """The peer's ports of the connections `role` holds in TIME_WAIT."""
    out = sb.exec(role, "ss", "-Htan", "state", "time-wait", "dst", peer).stdout
    return {int(line.split()[-1].rpartition(":")[2]) for line in out.splitlines()}


def test_the_commands_ports_are_not_the_pods_so_its_own_new_connections_are_not_refused_after(
        cluster: Cluster) -> None:
    """The command's connections leave as the pod's, with TCP timestamps of their own: one that used
    the same port as a later one of the pod's own left the server (which closed first) a TIME_WAIT
    that refused the pod's SYN as old (PAWS; 35-60 of these 1,500 were, before; in the real cluster
    205-301 of 3,000). The command's ports, and those the agent maps them to, are above the pod's
    range; and as each session has another tunnel address, its timestamps come from the clock as it
    is, or a second session right after the first found its connections refused as older (18)."""
    sb, n = cluster.sb, 1500
    low, high = COMMAND_PORTS
    pod_range = [int(p) for p in sb.exec("pod", "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split()]
    assert pod_range[1] < low, pod_range
    before, before_svc = _time_wait_ports(sb, "svc", POD), _tcp_ext(sb, "svc")
    for _ in range(2):
        out = ok(mrd_run(sb, "sh", "-c", "cat /proc/sys/net/ipv4/ip_local_port_range && "
                         f"{sys.executable} -c \"$0\" {SVC} {n}", CONNECTIONS)).split()
        assert [int(p) for p in out[:2]] == [low, high] and low <= int(out[2]) <= int(out[3]) <= high, out
    seen = _time_wait_ports(sb, "svc", POD) - before
    assert len(seen) > n and all(low <= port <= high for port in seen), sorted(seen)[:5]
    between_svc, before_pod = _tcp_ext(sb, "svc"), _tcp_ext(sb, "pod")
    sb.exec("pod", sys.executable, "-c", CONNECTIONS, SVC, str(n), timeout=120).check_returncode()
    after_pod, after_svc = _tcp_ext(sb, "pod"), _tcp_ext(sb, "svc")
    refused = [between_svc["PAWSTimewait"] - before_svc["PAWSTimewait"],
               after_svc["PAWSTimewait"] - between_svc["PAWSTimewait"]]
    assert refused == [0, 0] and after_pod["TCPSynRetrans"] - before_pod["TCPSynRetrans"] == 0, refused


def test_dns_over_udp_with_dig(cluster: Cluster) -> None:
    out = ok(mrd_run(cluster.sb, "dig", "+search", "+short", "+time=2", "+tries=3", "svc"))
    assert out == f"{SVC}\n"


def test_bulk_tcp_both_ways_is_byte_exact(cluster: Cluster, tmp_path: Path) -> None:
    # Big transfers go through the TUN offloads (64 KiB super-packets, virtio headers).
    body = tmp_path / "body"
    body.write_bytes(os.urandom(8 << 20))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    script = (f"curl -sS --max-time 30 --data-binary @{body} http://{SVC}/ && "
              f"curl -sS --max-time 30 -o /dev/null -w '%{{size_download}}\\n' http://{SVC}/bytes/{20 << 20}")
    out = ok(mrd_run(cluster.sb, "sh", "-c", script))
    assert out.splitlines() == [f"{digest} from {POD}", str(20 << 20)]


def test_two_sessions_at_once(cluster: Cluster, tmp_path: Path) -> None:
    """Both work at once with their own tunnel addresses, and one ending leaves the other working."""
    # Files in tmp_path are the barriers: each command marks itself up and waits for the other;
    # then "b" waits for "go", which the test creates once "a" has ended and been torn down.
    wait_for = 'n=0; while [ ! -e {f} ]; do sleep 0.1; n=$((n+1)); [ $n -gt 400 ] && exit 9; done; '
    script = ("ip -4 -o addr show dev mrd0 | awk '{print $4}'; touch D/$0; " + wait_for.format(f="D/a")
              + wait_for.format(f="D/b") + "curl -sS --max-time 10 http://svc/; "
              + 'if [ "$0" = b ]; then ' + wait_for.format(f="D/go") + "curl -sS --max-time 10 http://svc/; fi"
              ).replace("D/", f"{tmp_path}/")
    a, b = (start_run(cluster.sb, "sh", "-c", script, name) for name in ("a", "b"))
    code_a, out_a, err_a = finish(a)
    assert code_a == 0, err_a
    # a's table is gone but b's stays, and forwarding stays on for b.
    assert wait_until(lambda: len([x for x in leftovers(cluster.sb) if "mirrord_ns_" in x]) == 1, CLEAN_TIMEOUT)
    assert "conf/eth0/forwarding=1" in leftovers(cluster.sb)
    (tmp_path / "go").touch()
    code_b, out_b, err_b = finish(b)
    assert code_b == 0, err_b
    reply = f"hello from svc, you are {POD}"
    addr_a, *replies_a = out_a.splitlines()
    addr_b, *replies_b = out_b.splitlines()
    assert (replies_a, replies_b) == ([reply], [reply, reply])
    addrs = [ipaddress.ip_interface(addr).ip for addr in (addr_a, addr_b)]
    assert addrs[0] != addrs[1] and all(addr in TUNNEL_NET for addr in addrs)
    assert_clean(cluster.sb)


# --- the command's process: status, output, user, signals

@pytest.mark.parametrize("script, code", [
    ("exit 0", 0),
    ("exit 7", 7),
    ("kill -KILL $$", 128 + signal.SIGKILL),
    ("kill -TERM $$", 128 + signal.SIGTERM),
])
def test_exit_status_is_the_commands(cluster: Cluster, script: str, code: int) -> None:
    r = mrd_run(cluster.sb, "sh", "-c", script)
    assert r.returncode == code, r.stderr


@pytest.mark.parametrize("name, code", [
    ("no-such-command-mirrord-ns", 127),
    ("/nonexistent/mirrord-ns", 127),
    ("not-executable", 126),  # as a shell reports them
    ("garbage-binary", 126),
])
def test_command_that_cannot_start(cluster: Cluster, tmp_path: Path, name: str, code: int) -> None:
    command = name
    if code == 126:
        command = str(tmp_path / name)
        Path(command).write_bytes(b"\x7fELF\x00garbage" if name == "garbage-binary" else b"#!/bin/sh\n")
        os.chmod(command, 0o755 if name == "garbage-binary" else 0o644)
    r = mrd_run(cluster.sb, command)
    assert r.returncode == code
    assert r.stdout == ""
    assert command in r.stderr and len(r.stderr.splitlines()) == 1
    assert_clean(cluster.sb)


def test_stdout_is_only_the_commands(cluster: Cluster) -> None:
    quiet = mrd_run(cluster.sb, "echo", "hi")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "hi\n", "")  # quiet by default
    verbose = mrd_run(cluster.sb, "echo", "hi", verbose=True)
    assert (verbose.returncode, verbose.stdout) == (0, "hi\n")
    # -v talks, but only on stderr: progress, then the session's counters.
    assert "tunnel address" in verbose.stderr and "packets" in verbose.stderr


def test_stdin_is_passed_through(cluster: Cluster) -> None:
    data = "line one\nline two\n" * 1000
    r = mrd_run(cluster.sb, "cat", input=data)
    assert (r.returncode, r.stdout) == (0, data)


def test_runs_as_the_sudo_user(cluster: Cluster, nobody_identity: None) -> None:
    env = run_env(SUDO_UID="65534", SUDO_GID="65534", SUDO_USER="nobody")
    # No root group may survive the switch, and the user can still resolve and connect.
    out = ok(mrd_run(cluster.sb, "sh", "-c", "id -u; id -g; id -G; getent hosts svc; "
                     f"curl -sS --max-time 10 http://{SVC}/", env=env))
    assert out.splitlines()[:3] == ["65534", "65534", "65534"]
    assert out.splitlines()[3].split() == [SVC, f"svc.{DOMAIN}"]
    assert out.splitlines()[4:] == [f"hello from svc, you are {POD}"]


def test_sigterm_is_forwarded_and_its_status_returned(cluster: Cluster) -> None:
    # `sleep & wait`: a shell runs traps during `wait`, not while a foreground child runs.
    p = start_run(cluster.sb, "sh", "-c", 'trap "echo got-term; exit 5" TERM; echo ready; sleep 30 & wait')
    assert read_line(p) == "ready\n"
    p.send_signal(signal.SIGTERM)
    code, out, err = finish(p, timeout=20)
    assert (code, out) == (5, "got-term\n"), err
    assert_clean(cluster.sb)


def test_sigterm_before_the_command_starts_cleans_up_and_exits_130(fresh_cluster: Cluster) -> None:
    """A supervisor's SIGTERM while run still connects (the agent frozen mid-handshake): the
    session is given up as for Ctrl-C, exit 130, one quiet exit; no command ever starts."""
    sb, agent = fresh_cluster.sb, fresh_cluster.agent
    frozen = [agent.pid, *children(agent.pid)]
    kill_pids(frozen, signal.SIGSTOP)
    try:
        p = start_run(sb, "sh", "-c", "echo started")

        def connected() -> bool:
            return bool(sb.exec("laptop", "ss", "-Htn", "state", "established", "dst", sb.agent_address).stdout.strip())
        assert wait_until(connected, RUN_TIMEOUT), "run never connected to the agent"
        p.send_signal(signal.SIGTERM)
        code, out, err = finish(p, timeout=20)
        assert (code, out) == (130, ""), err
        assert "Traceback" not in err and len(err.splitlines()) <= 1, err
    finally:
        kill_pids(frozen, signal.SIGCONT)
    assert_clean(sb)


def test_a_signal_during_the_cleanup_after_the_command_does_not_cut_it_short(cluster: Cluster) -> None:
    """The command exits leaving a child that ignores SIGTERM: run stops it (SIGTERM, then SIGKILL
    a second later). A SIGTERM to run meanwhile must not leave that child running."""
    # The command exits only once its child ignores SIGTERM (told through a FIFO): before, under
    # load, run's SIGTERM could reach the child before its trap was set, and killed it at once.
    p = start_run(cluster.sb, "sh", "-c", 'f=$(mktemp -u); mkfifo "$f"; '
                  '(trap "" TERM; echo set > "$f"; exec sleep 300) & echo $!; read -r _ < "$f"; rm -f "$f"')
    left = int(read_line(p))
    try:
        time.sleep(0.3)  # run is sending SIGTERM to what the command left, and waiting
        assert pid_alive(left) and pid_alive(p.pid)
        p.send_signal(signal.SIGTERM)
        code, _, err = finish(p, timeout=20)
        assert code == 0, err
        assert wait_until(lambda: not pid_alive(left), 5), "the command's child outlived run"
    finally:
        kill_pids([left])
    assert_clean(cluster.sb)


def test_ctrl_c_in_a_terminal(cluster: Cluster) -> None:
    """^C typed into a terminal reaches the command once (from the tty), and run returns its status."""
    master, slave = pty.openpty()

    def take_terminal() -> None:  # in the child, after setsid: make the pty its controlling tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(cluster.sb.run_args("sh", "-c", 'trap "echo got-int; exit 3" INT; tty; echo ready; sleep 30'),
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         preexec_fn=take_terminal, env=run_env())
    cluster.sb.procs.append(p)
    os.close(slave)
    try:
        out = _read_pty_until(master, b"ready", RUN_TIMEOUT)
        # Type ^C only once `sleep` runs in the foreground (exec'd, not merely forked): a job
        # started after the signal never sees it, and the shell waits 30 s before its trap.
        assert wait_until(lambda: _sleeping(p.pid), RUN_TIMEOUT)
        os.write(master, b"\x03")
        code = p.wait(20)
        out += _read_pty_until(master, None, 5)
    finally:
        os.close(master)
    assert code == 3, out
    assert b"/dev/pts/" in out  # the command's stdin is the terminal itself
    assert b"got-int" in out
    assert_clean(cluster.sb)


def _sleeping(run_pid: int) -> bool:
    """Whether the command under `run` has a child that already exec'd `sleep`."""
    for sh in children(run_pid):
        for pid in children(sh):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                    return True
            except OSError:
                pass
    return False


def _read_pty_until(fd: int, marker: bytes | None, timeout: float) -> bytes:
    """Read a pty master until `marker` shows up (or EOF/EIO when marker is None)."""
    out = b""
    deadline = time.monotonic() + timeout
    while marker is None or marker not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            assert marker is None, f"no {marker!r} on the terminal within {timeout} s: {out!r}"
            break
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every process holding the slave side has exited
            break
        if not chunk:
            break
        out += chunk
    return out


# --- errors before the command starts: exit 2, one line on stderr, nothing runs

def _new_key(path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    return path


def _assert_refused(r: subprocess.CompletedProcess[str], marker: Path, words: str) -> None:
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrord-ns: "), r.stderr
    assert words in lines[0], r.stderr
    assert not marker.exists(), "the command ran"


def test_wrong_client_key(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = mrd_run(cluster.sb, "touch", str(marker), identity=str(_new_key(tmp_path / "other")))
    _assert_refused(r, marker, "identity key was refused")


def test_wrong_pinned_host_key(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    other = _new_key(tmp_path / "other")
    r = mrd_run(cluster.sb, "touch", str(marker), host_key=f"{other}.pub")
    _assert_refused(r, marker, "host key is not the pinned one")


@pytest.mark.parametrize("address", [
    "198.19.0.2:2299",  # the node, a port nobody listens on
    "198.18.0.99:2222",  # the cluster network, which the laptop has no route to
])
def test_agent_unreachable(cluster: Cluster, tmp_path: Path, address: str) -> None:
    marker = tmp_path / "ran"
    r = mrd_run(cluster.sb, "touch", str(marker), agent=address)
    _assert_refused(r, marker, address)
