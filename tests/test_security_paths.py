"""Container paths are resolved inside the container: attacks made with a container's own files.

A "container" here is a directory with busybox in it and a process chrooted there, in a mount
namespace of its own, living in one of the sandbox's network namespaces. Everything under its
root is the attacker's: symlinks out of it (absolute, or through /proc's magic links), a FIFO or
a huge resolver file, an /etc swapped for a symlink to a host directory while attach works,
edits to its resolver file while a killed attach's original waits to be put back.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import (RUN_TIMEOUT, SVC, Cluster, assert_clean, children, kill_pids, mrd_run, pid_alive, read_line,
                      run_argv, run_env)
from conftest import wait_until
from test_attach import ATTACH_TIMEOUT, detach, ip, make_app

from mirrord_tun.netns import resolvconf
from mirrord_tun.sandbox import NODE_UPLINK, RESOLV_CONF, Sandbox, SANDBOX_RESUME_TIMEOUT

AGENT = f"{NODE_UPLINK}:2223"  # a second agent, with --pid, beside the cluster's own on 2222
ORIGINAL = "nameserver 198.18.7.7\nsearch example.internal\noptions ndots:2"  # no final newline, on purpose
RACE_ROUNDS = 30


@dataclass
class Container:
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def app(cluster: Cluster) -> Iterator[str]:
    yield from make_app(cluster.sb)


@contextlib.contextmanager
def container(sb: Sandbox, netns: str, setup: Callable[[Path], None], script: str = "exec /bin/busybox sleep 1000",
              with_proc: bool = False) -> Iterator[Container]:
    """A process running `script` under busybox sh, chrooted into a fresh root that `setup` fills."""
    root = Path(tempfile.mkdtemp(prefix="container.", dir=sb.dir))
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "proc").mkdir()
    setup(root)
    mount = f"mount -t proc proc {shlex.quote(str(root / 'proc'))} && " if with_proc else ""
    inner = f"{mount}exec chroot {shlex.quote(str(root))} /bin/busybox sh -c {shlex.quote(script)}"
    # Every step execs in place: the PID we hold is the container's process.
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c", inner])
    sb.procs.append(proc)
    try:
        assert wait_until(lambda: _root_of(proc.pid) == os.stat(root).st_ino, 10), "container did not start"
        yield Container(root, proc)
    finally:
        sb.stop(proc, signal.SIGKILL)
        sb.procs.remove(proc)
        shutil.rmtree(root, ignore_errors=True)


def _root_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/root").st_ino
    except OSError:
        return None


@contextlib.contextmanager
def pid_agent(sb: Sandbox, pid: int, resume_timeout: float = SANDBOX_RESUME_TIMEOUT, extra: tuple[str, ...] = ()
              ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """An agent working in `pid`'s namespace (as one on a node does for a container), with `extra`
    options; its log file."""
    log = Path(sb.dir) / f"agent-{pid}.log"
    with open(log, "w") as f:
        agent = sb.start_ready("node", [
            sys.executable, "-m", "mirrord_tun", "agent", "--listen", AGENT,
            "--authorized-key", sb.keys.identity_pub, "--host-key", sb.keys.host_key,
            "--pid", str(pid), "--resume-timeout", str(resume_timeout), *extra], ready="listening", stderr=f)
    try:
        yield agent, log
    finally:
        sb.stop(agent)
        sb.procs.remove(agent)


def start_attach_pid(sb: Sandbox, pid: int) -> tuple[subprocess.Popen[bytes], str]:
    """`attach --pid` from the laptop; waits for its "is in the pod's network" line and returns it."""
    argv = ["ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-m", "mirrord_tun", "attach",
            "--pid", str(pid), "--no-mirror", "--agent", sb.agent_address,
            "--identity", sb.keys.identity, "--agent-host-key", sb.keys.host_pub]
    # Unbuffered: its lines are read one by one, none may wait in a buffer that select() cannot see.
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env(), bufsize=0)
    sb.procs.append(p)
    p.stdout = p.stderr  # type: ignore[assignment]  # read_line reads stdout: attach talks on stderr
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while True:
        line = read_line(p, max(deadline - time.monotonic(), 0.1))
        assert line, "attach ended before attaching"
        if "in the pod's network" in line:
            return p, line


def end_attach(sb: Sandbox, p: subprocess.Popen[bytes]) -> None:
    assert detach(p) == 0
    sb.stop(p)  # closes its pipe
    sb.procs.remove(p)


def kill_attach(sb: Sandbox, p: subprocess.Popen[bytes], app: str) -> None:
    sb.stop(p, signal.SIGKILL)  # `ip netns exec` execs in place: this is the attach process
    sb.procs.remove(p)
    assert wait_until(lambda: "mrd0" not in ip("-n", app, "link"), 10)


def state_file(path: Path) -> Path:
    st = os.stat(path)
    return Path(resolvconf.STATE_DIR) / f"resolv.{st.st_dev}.{st.st_ino}.json"


def restore_leftovers() -> list[str]:
    """What `mirrord-ns cleanup` does for resolver files; it must not warn here."""
    warnings: list[str] = []
    done = resolvconf.restore_leftovers(warnings.append)
    assert warnings == []
    return done


def fds_of_agent(agent: subprocess.Popen[bytes]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [agent.pid, *children(agent.pid)])


# --- the agent: the resolver file it reports for --pid

@pytest.mark.parametrize("via", ["absolute", "magic-link"])
def test_a_container_symlink_never_sends_the_nodes_file(cluster: Cluster, via: str) -> None:
    """/etc/resolv.conf -> a node file (directly, or via /proc/self/root in the container's own procfs):
    the session's command never sees the node's secret; an absolute link reads the container's file."""
    sb = cluster.sb
    secret = f"node-secret-{secrets.token_hex(16)}"
    fd, secret_path = tempfile.mkstemp(prefix="node-secret.")  # on the node, in no container
    with os.fdopen(fd, "w") as f:
        f.write(f"nameserver 198.18.0.53\n# {secret}\n")
    link = secret_path if via == "absolute" else f"/proc/self/root{secret_path}"  # self: whoever reads it
    try:
        with container(sb, sb.ns("pod"), lambda root: _etc(root, link=link), with_proc=via == "magic-link") as ctr, \
                pid_agent(sb, ctr.pid) as (_agent, log):
            out = mrd_run(sb, "cat", "/etc/resolv.conf", agent=AGENT)
            assert out.returncode == 0, out.stderr
            assert secret not in out.stdout + out.stderr
            if via == "absolute":
                # The file of that name in the container is what its processes read: that one is sent.
                own = ctr.root / secret_path.lstrip("/")
                own.parent.mkdir(parents=True)
                own.write_text("nameserver 198.18.0.53\n# the container's own\n")
                out = mrd_run(sb, "cat", "/etc/resolv.conf", agent=AGENT)
                assert out.stdout == "nameserver 198.18.0.53\n# the container's own\n", out.stderr
            else:
                assert "magic link" in log.read_text()
        assert_clean(sb)
    finally:
        os.unlink(secret_path)


def _etc(root: Path, text: str | None = None, link: str | None = None) -> None:
    (root / "etc").mkdir()
    if text is not None:
        (root / "etc" / "resolv.conf").write_text(text)
    if link is not None:
        (root / "etc" / "resolv.conf").symlink_to(link)


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_fifo_or_huge_resolver_file_neither_stalls_nor_leaks(cluster: Cluster, kind: str) -> None:
    """A FIFO is never opened (no reader appears for the attacker's writer); a 2 MiB file is refused,
    not sent; sessions start, a second one runs beside the first, and nothing stays behind."""
    sb = cluster.sb
    marker = f"huge-{secrets.token_hex(8)}"

    def setup(root: Path) -> None:
        _etc(root)
        conf = root / "etc" / "resolv.conf"
        if kind == "fifo":
            os.mkfifo(conf)
        else:
            line = f"nameserver 198.18.0.53 # {marker}\n".encode()
            conf.write_bytes(line * (2 * 1024 * 1024 // len(line) + 1))

    with container(sb, sb.ns("pod"), setup) as ctr, pid_agent(sb, ctr.pid) as (agent, log):
        fds = fds_of_agent(agent)
        first = subprocess.Popen(run_argv(sb, "sh", "-c", "echo up; exec sleep 120", agent=AGENT),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=run_env())
        sb.procs.append(first)
        try:
            assert read_line(first, RUN_TIMEOUT) == "up\n"
            second = mrd_run(sb, "sh", "-c", f"cat /etc/resolv.conf; curl -sS -m 10 http://{SVC}/", agent=AGENT)
            assert "hello from svc" in second.stdout, second.stderr
            assert marker not in second.stdout
            if kind == "fifo":  # the attacker's writer finds no reader: the agent never opened it
                with pytest.raises(OSError) as e:
                    os.open(ctr.root / "etc" / "resolv.conf", os.O_WRONLY | os.O_NONBLOCK)
                assert e.value.errno == errno.ENXIO
        finally:
            sb.stop(first)
            sb.procs.remove(first)
        assert_clean(sb)
        assert wait_until(lambda: fds_of_agent(agent) <= fds, 20), (fds, fds_of_agent(agent))
        assert ("a FIFO" if kind == "fifo" else "larger than 65536 bytes") in log.read_text()


# --- attach --pid: the resolver file it rewrites and restores

def test_attach_never_writes_through_an_etc_swapped_for_a_symlink(cluster: Cluster, app: str) -> None:
    """The container swaps /etc between its real directory and a symlink to a host directory as
    fast as it can, while attach comes and goes: nothing ever lands in the host directory, no
    directory is made in the container, and its own file ends as it began."""
    sb = cluster.sb
    host_dir = tempfile.mkdtemp(prefix="host-dir.", dir=sb.dir)

    def setup(root: Path) -> None:
        _etc(root, ORIGINAL)
        (root / "etc.link").symlink_to(host_dir)

    swap = ("B=/bin/busybox; while :; do $B mv /etc /etc.real; $B mv /etc.link /etc; "
            "$B mv /etc /etc.link; $B mv /etc.real /etc; done")
    given = 0
    with container(sb, app, setup, script=swap) as ctr:
        for _ in range(RACE_ROUNDS):
            p, line = start_attach_pid(sb, ctr.pid)
            given += "pod resolver" in line
            assert os.listdir(host_dir) == []
            end_attach(sb, p)
            assert os.listdir(host_dir) == []
            assert set(os.listdir(ctr.root)) <= {"bin", "proc", "etc", "etc.real", "etc.link"}
        # Frozen first, so that no `mv` starts after we listed them; then the running one dies too,
        # before it could rename /etc under the check below.
        kill_pids([ctr.proc.pid], signal.SIGSTOP)
        movers = children(ctr.proc.pid)
        kill_pids([ctr.proc.pid, *movers])
        ctr.proc.wait()
        assert wait_until(lambda: not any(pid_alive(m) for m in movers), 10)
        etc = ctr.root / "etc"
        if etc.is_symlink() or not etc.exists():  # stopped mid-swap: put its /etc back
            with contextlib.suppress(FileNotFoundError):
                etc.unlink()
            (ctr.root / "etc.real").rename(etc)
        assert (etc / "resolv.conf").read_text() == ORIGINAL
        assert not state_file(etc / "resolv.conf").exists()
    assert given > 0, "the race never let attach reach the file: nothing was tested"


def test_a_killed_attach_is_put_back_from_roots_state_not_from_the_file(cluster: Cluster, app: str) -> None:
    """After a SIGKILL, the container writes what the old in-file scheme would have trusted as the
    original; the next attach, and `restore_leftovers` (cleanup), put back the recorded original."""
    sb = cluster.sb
    forged = "# mirrord-ns: the pod's resolver; the original follows as '#~' lines\n#~ nameserver 198.18.6.6\n"
    with container(sb, app, lambda root: _etc(root, ORIGINAL)) as ctr:
        conf = ctr.root / "etc" / "resolv.conf"
        record = state_file(conf)
        for successor in ("attach", "cleanup"):
            p, line = start_attach_pid(sb, ctr.pid)
            assert "pod resolver" in line
            assert RESOLV_CONF.strip() in conf.read_text()
            assert stat.S_IMODE(os.stat(resolvconf.STATE_DIR).st_mode) == 0o700
            assert stat.S_IMODE(record.stat().st_mode) == 0o600
            kill_attach(sb, p, app)
            with open(conf, "r+") as f:  # the container edits its file in place
                f.truncate()
                f.write(forged)
            if successor == "attach":
                p, _ = start_attach_pid(sb, ctr.pid)
                end_attach(sb, p)
            else:
                assert any(str(conf.relative_to(ctr.root)) in done for done in restore_leftovers())
            assert conf.read_text() == ORIGINAL
            assert not record.exists()


def test_a_replaced_file_is_not_written_by_cleanup(cluster: Cluster, app: str) -> None:
    """A killed attach's record names one inode: once the container has put another file in its
    place, cleanup writes nothing into it and only drops the record."""
    sb = cluster.sb
    with container(sb, app, lambda root: _etc(root, ORIGINAL)) as ctr:
        conf = ctr.root / "etc" / "resolv.conf"
        record = state_file(conf)
        p, _ = start_attach_pid(sb, ctr.pid)
        kill_attach(sb, p, app)
        fresh = ctr.root / "etc" / "new"
        fresh.write_text("nameserver 198.18.5.5\n")
        fresh.rename(conf)
        restore_leftovers()
        assert conf.read_text() == "nameserver 198.18.5.5\n"
        assert not record.exists()


def test_attach_makes_only_the_file_and_takes_it_away(cluster: Cluster, app: str) -> None:
    """No /etc/resolv.conf: attach creates that file (never a directory), and a killed attach's file
    is removed by cleanup. No /etc at all: attach leaves the resolver alone and makes nothing."""
    sb = cluster.sb
    with container(sb, app, lambda root: _etc(root)) as ctr:
        conf = ctr.root / "etc" / "resolv.conf"
        p, line = start_attach_pid(sb, ctr.pid)
        assert "pod resolver" in line and RESOLV_CONF.strip() in conf.read_text()
        record = state_file(conf)
        kill_attach(sb, p, app)
        restore_leftovers()
        assert not conf.exists() and not record.exists()
    with container(sb, app, lambda root: None) as ctr:
        p, line = start_attach_pid(sb, ctr.pid)
        assert "pod resolver" not in line
        end_attach(sb, p)
        assert sorted(os.listdir(ctr.root)) == ["bin", "proc"]
