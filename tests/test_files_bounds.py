"""A container cannot stall or swamp the file service, from the attacker's side.

A file system that never answers: a real FUSE mount (tests/hangfs.py: INIT answered, then
nothing) inside the test container's own mount namespace. Refused by default, it cannot take a
thread of the agent; served on request (`--serve-fs fuse`), a request under it gets a clear
failure after `--file-timeout`, and it stalls neither a new SSH connection's files nor a new
`run`. No test waits on a clock: a hang shows as a test timeout. A huge directory: listed in
chunks, the agent's memory does not grow with it.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from conftest import RUN_TIMEOUT, Cluster, children, read_line, run_env
from test_files import run_mount
from test_security_paths import AGENT, Container, container, pid_agent

from mirrord_tun.sandbox import Sandbox

HANGFS = str(Path(__file__).with_name("hangfs.py"))
CHANNELS = 40

SFTP = """
import asyncio, sys
import asyncssh
from mirrord_tun.connect import load_keys

async def ask(conn, path):
    async with conn.start_sftp_client() as sftp:
        try:
            if path.endswith("//"):  # only how many
                return f"{path} listed {len([n async for n in sftp.scandir(path)])}"
            if path.endswith("/"):
                return f"{path} listed {sorted(await sftp.listdir(path))}"
            async with sftp.open(path) as f:
                return f"{path} read {(await f.read())!r}"
        except asyncssh.SFTPError as e:
            return f"{path} refused {e.code} {e.reason}"

async def main() -> None:
    key, pinned = load_keys(sys.argv[2], sys.argv[3])
    host, port = sys.argv[1].rsplit(":", 1)
    async with asyncssh.connect(host, int(port), username="x", client_keys=[key], known_hosts=([pinned], [], []),
                                agent_path=None, config=None) as conn:
        if sys.argv[4] == "together":  # every path on a channel of its own, all at once
            tasks = [asyncio.ensure_future(ask(conn, p)) for p in sys.argv[5:]]
            print("asked", flush=True)
            for answer in await asyncio.gather(*tasks):
                print(answer, flush=True)
        else:
            for path in sys.argv[5:]:
                print(await ask(conn, path), flush=True)
asyncio.run(main())
"""


def sftp(sb: Sandbox, mode: str, *paths: str, **popen: object) -> list[str]:
    return ["ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-c", SFTP, AGENT, sb.keys.identity,
            sb.keys.host_pub, mode, *paths]


@contextlib.contextmanager
def hung_container(sb: Sandbox, resolv_link: bool = False) -> Iterator[tuple[Container, subprocess.Popen[str]]]:
    """The test container with a FUSE file system that never answers at /mnt/hang, and a link
    into it at /etc/app/evil (and at /etc/resolv.conf, which every session's start reads, if
    `resolv_link`); yields it and the FUSE server (its stdout: one line per request)."""
    def setup(root: Path) -> None:
        (root / "mnt" / "hang").mkdir(parents=True)
        (root / "etc" / "app").mkdir(parents=True)
        (root / "etc" / "app" / "config.yaml").write_text("ok\n")
        (root / "etc" / "app" / "evil").symlink_to("/mnt/hang/file")
        if resolv_link:
            (root / "etc" / "resolv.conf").symlink_to("/mnt/hang/resolv.conf")

    with container(sb, sb.ns("pod"), setup) as ctr:
        server = subprocess.Popen(["nsenter", f"--mount=/proc/{ctr.pid}/ns/mnt", "--", sys.executable, HANGFS,
                                   str(ctr.root / "mnt" / "hang")], stdout=subprocess.PIPE, text=True)
        try:
            assert read_line(server, 10) == "mounted\n"  # type: ignore[arg-type]
            yield ctr, server
        finally:
            server.kill()  # closing /dev/fuse aborts the connection: every waiting request fails
            server.wait()
            subprocess.run(["nsenter", f"--mount=/proc/{ctr.pid}/ns/mnt", "--", "umount", "-l",
                            str(ctr.root / "mnt" / "hang")], capture_output=True)
    assert not [line for line in open("/proc/self/mountinfo") if "hangfs" in line]


def test_a_hung_fuse_mount_is_refused_by_default(cluster: Cluster) -> None:
    """Read directly, listed, reached through a link (also as the resolv.conf a session's start
    reads): refused or not found, and not one request reaches the FUSE server."""
    sb = cluster.sb
    with hung_container(sb, resolv_link=True) as (ctr, server), pid_agent(sb, ctr.pid):
        done = subprocess.run(run_mount(sb, ["/etc/app"], "cat /etc/app/config.yaml"), capture_output=True,
                              env=run_env(), timeout=RUN_TIMEOUT)
        assert done.returncode == 0 and done.stdout == b"ok\n", done.stderr
        out = subprocess.run(sftp(sb, "each", "/mnt/hang/file", "/mnt/hang/", "/etc/app/evil", "/mnt/",
                                  "/etc/app/config.yaml"), capture_output=True, text=True, env=run_env(),
                             timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("/mnt/hang/file refused 3 /mnt/hang is a fuse.hangfs file system"), lines
        assert lines[1].startswith("/mnt/hang/ refused 3 /mnt/hang is a fuse.hangfs"), lines
        assert lines[2].startswith("/etc/app/evil refused 2"), lines  # the link finds the directory under it
        assert lines[3] == "/mnt/ listed ['.', 'hang']", lines
        assert lines[4] == "/etc/app/config.yaml read 'ok\\n'", lines
    assert server.stdout is not None and server.stdout.read() == ""  # not one request reached it


def test_served_on_request_a_hung_read_fails_clearly_and_stalls_no_one_else(cluster: Cluster) -> None:
    """`--serve-fs fuse --file-timeout 2`: a read under the mount is answered with a failure;
    meanwhile and after, a new connection reads the container's files and a new `run` works."""
    sb = cluster.sb
    with hung_container(sb) as (ctr, server), pid_agent(sb, ctr.pid, extra=("--serve-fs", "fuse",
                                                                             "--file-timeout", "2")):
        out = subprocess.run(sftp(sb, "each", "/mnt/hang/file", "/etc/app/config.yaml"), capture_output=True,
                             text=True, env=run_env(), timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "/mnt/hang/file refused 4 no answer from the container's file system within 2 s",
            "/etc/app/config.yaml read 'ok\\n'"], out.stdout
        assert read_line(server, 10).startswith("request")  # type: ignore[arg-type]  # it did reach FUSE


def test_forty_channels_on_a_hung_file_delay_neither_a_new_session_nor_a_new_run(cluster: Cluster) -> None:
    """The attack of issue 21: 40 SFTP channels each wait on the hung mount (a long --file-timeout,
    so they all still wait); a new connection's files and `run -- true` still work meanwhile."""
    sb = cluster.sb
    with hung_container(sb) as (ctr, server), pid_agent(sb, ctr.pid, extra=("--serve-fs", "fuse",
                                                                             "--file-timeout", "600")):
        waiting = subprocess.Popen(sftp(sb, "together", *(f"/mnt/hang/f{i}" for i in range(CHANNELS))),
                                   stdout=subprocess.PIPE, text=True, env=run_env())
        sb.procs.append(waiting)  # type: ignore[arg-type]
        try:
            assert read_line(waiting, RUN_TIMEOUT) == "asked\n"  # type: ignore[arg-type]
            assert read_line(server, 10).startswith("request")  # type: ignore[arg-type]  # the hang has begun
            out = subprocess.run(sftp(sb, "each", "/etc/app/config.yaml"), capture_output=True, text=True,
                                 env=run_env(), timeout=RUN_TIMEOUT)
            assert out.stdout == "/etc/app/config.yaml read 'ok\\n'\n", out.stderr
            done = subprocess.run(run_mount(sb, [], "true"), capture_output=True, env=run_env(), timeout=RUN_TIMEOUT)
            assert done.returncode == 0, done.stderr
            assert waiting.poll() is None  # they all still wait: nothing above needed them to end
        finally:
            sb.stop(waiting)  # type: ignore[arg-type]
            sb.procs.remove(waiting)  # type: ignore[arg-type]


ENTRIES = 60_000
NAME = "n" * 200  # long names: what an entry costs in memory grows with it


def peak_rss_kib(agent: subprocess.Popen[bytes]) -> int:
    """The largest VmHWM among the agent's processes (its guard and its worker)."""
    peaks = []
    for pid in [agent.pid, *children(agent.pid)]:
        with open(f"/proc/{pid}/status") as f:
            peaks += [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
    return max(peaks)


def test_a_huge_directory_is_listed_without_the_agent_holding_it(cluster: Cluster) -> None:
    """60,000 entries of 200-character names (some 100 MB as a whole list of SFTP names): the
    agent's peak memory grows by far less than that, as it reads the directory a chunk at a time."""
    sb = cluster.sb

    def setup(root: Path) -> None:
        (root / "huge").mkdir()
        for i in range(ENTRIES):
            (root / "huge" / f"{NAME}{i:06d}").touch()

    with container(sb, sb.ns("pod"), setup) as ctr, pid_agent(sb, ctr.pid) as (agent, _log):
        warm = subprocess.run(sftp(sb, "each", "/bin//"), capture_output=True, text=True, env=run_env(),
                              timeout=RUN_TIMEOUT)
        assert warm.stdout == "/bin// listed 2\n", warm.stderr  # ".", busybox
        before = peak_rss_kib(agent)
        out = subprocess.run(sftp(sb, "each", "/huge//"), capture_output=True, text=True, env=run_env(),
                             timeout=RUN_TIMEOUT * 4)
        assert out.stdout == f"/huge// listed {ENTRIES + 1}\n", out.stderr
        grown = peak_rss_kib(agent) - before
        print(f"agent peak memory grew by {grown} KiB listing {ENTRIES} entries")
        assert grown < 20 * 1024, grown
