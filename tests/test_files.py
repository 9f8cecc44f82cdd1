"""`run --mount PATH`: the container's files, read-only, from the attacker's side.

The "container" is test_security_paths's: a process chrooted into a root of its own, in a mount
namespace of its own, living in the pod's network namespace, here running as uid 1000. The
agent works for it with --pid. Everything under its root is the attacker's: symlinks, absolute
and relative, towards a secret on the node, a file its own user may not read.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from conftest import RUN_TIMEOUT, Cluster, assert_clean, pid_alive, read_line, run_env, wait_until
from test_resume import GRACE, OUTAGE, RELAY_PORT, SHORT_GRACE, kill, start_relay
from test_security_paths import AGENT, Container, container, fds_of_agent, pid_agent

from mirrord_tun.mounts import volume_mount_paths
from mirrord_tun.sandbox import LAPTOP_ADDR, Sandbox

BIG = 20 * 1024 * 1024
FILES = 200
# As uid 1000 (busybox su keeps the PID): its file checks are the agent's to make.
AS_USER = "exec /bin/busybox su app -c 'exec /bin/busybox sleep 1000'"


@pytest.fixture(scope="module")
def big() -> bytes:
    return secrets.token_bytes(BIG)


@pytest.fixture
def node_secret() -> Iterator[tuple[str, str]]:
    """A file on the node, in no container: (its path, the secret in it)."""
    secret = f"node-secret-{secrets.token_hex(16)}"
    fd, path = tempfile.mkstemp(prefix="node-secret.")
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.chmod(path, 0o644)
    yield path, secret
    os.unlink(path)


@contextlib.contextmanager
def app_container(sb: Sandbox, big: bytes, node_path: str) -> Iterator[Container]:
    def setup(root: Path) -> None:
        root.chmod(0o755)  # mkdtemp's 0700 would keep uid 1000 out of its own root
        etc = root / "etc"
        (etc / "app" / "many").mkdir(parents=True)
        (root / "bin" / "sh").symlink_to("busybox")
        (etc / "passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
        (etc / "group").write_text("root:x:0:\napp:x:1000:\n")
        (etc / "resolv.conf").write_text("nameserver 198.18.0.53\n")  # no warning about it
        (etc / "app" / "config.yaml").write_text("greeting: hello from the container\n")
        (etc / "app" / "big.bin").write_bytes(big)
        for i in range(FILES):
            (etc / "app" / "many" / f"f{i:04d}").write_text(str(i))
        (etc / "app" / "abs-link").symlink_to(node_path)
        (etc / "app" / "rel-link").symlink_to("../" * 12 + node_path.lstrip("/"))
        (etc / "app" / "dir-link").symlink_to(os.path.dirname(node_path))
        (etc / "app" / "own-link").symlink_to("/etc/app/config.yaml")
        private = etc / "app" / "private"
        private.write_text("not for uid 1000\n")
        os.chown(private, 4242, 4242)
        private.chmod(0o600)

    with container(sb, sb.ns("pod"), setup, script=AS_USER) as ctr:
        yield ctr


def run_mount(sb: Sandbox, paths: list[str], script: str, **popen: object) -> list[str]:
    argv = sb.run_args("sh", "-c", script)
    at = argv.index("--")
    argv[argv.index("--agent") + 1] = AGENT
    return argv[:at] + [a for p in paths for a in ("--mount", p)] + argv[at:]


def mrd(sb: Sandbox, paths: list[str], script: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(run_mount(sb, paths, script), capture_output=True, env=run_env(), timeout=RUN_TIMEOUT * 2)


def our_mounts() -> list[str]:
    """Every mount of ours that any process anywhere still sees."""
    found = []
    for info in glob.glob("/proc/[0-9]*/mountinfo"):
        with contextlib.suppress(OSError), open(info) as f:
            found += [line for line in f if "mirrord-ns:" in line]
    return found


def host_mounts() -> list[str]:
    """Our mounts and shadows as the host (this test's own mount namespace) sees them: never any."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "mirrord-ns:" in line or " /etc " in line or " /etc/app " in line]


def test_the_command_reads_lists_and_streams_the_containers_files_and_cannot_write(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    sb = cluster.sb
    node_path, secret = node_secret
    assert host_mounts() == []
    with app_container(sb, big, node_path) as ctr, pid_agent(sb, ctr.pid):
        script = ("cat /etc/app/config.yaml; cat /etc/app/own-link; ls /etc/app/many | wc -l; "
                  "sha256sum /etc/app/big.bin; stat -c %s /etc/app/big.bin; "
                  "for f in abs-link rel-link dir-link/$(basename " + node_path + ") private; do "
                  "cat /etc/app/$f && echo LEAK $f; done; "
                  "echo x > /etc/app/config.yaml && echo WROTE; touch /etc/app/new && echo MADE; "
                  "mkdir /etc/app/d && echo MKDIR; rm /etc/app/config.yaml && echo REMOVED; "
                  "cat /etc/app/config.yaml; test -e /etc/os-release && echo LOCAL-ETC")
        out = mrd(sb, ["/etc/app"], script)
        text, err = out.stdout.decode(), out.stderr.decode()
        assert out.returncode == 0, err
        lines = text.splitlines()
        assert lines[0] == lines[1] == "greeting: hello from the container"
        assert lines[2] == str(FILES)
        assert lines[3].split()[0] == hashlib.sha256(big).hexdigest()
        assert lines[4] == str(BIG)
        assert lines[5] == "greeting: hello from the container"  # unchanged after the write attempts
        assert lines[6] == "LOCAL-ETC"  # the rest of this machine's /etc is still there
        assert secret not in text + err
        for word in ("LEAK", "WROTE", "MADE", "MKDIR", "REMOVED"):
            assert word not in text
        assert "Read-only file system" in err
        assert "Permission denied" in err  # private: mode 0600, uid 4242; the container runs as 1000
        assert (ctr.root / "etc" / "app" / "config.yaml").read_text() == "greeting: hello from the container\n"
        assert not (ctr.root / "etc" / "app" / "new").exists()
    # /etc/app exists in no host directory: it was made in a tmpfs of the command's namespace.
    assert not os.path.exists("/etc/app")
    assert host_mounts() == []
    assert wait_until(lambda: not our_mounts(), 10), our_mounts()
    assert_clean(sb)


def test_nothing_stays_mounted_after_kill_9_of_run(cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    sb = cluster.sb
    with app_container(sb, big, node_secret[0]) as ctr, pid_agent(sb, ctr.pid) as (agent, _log):
        fds = fds_of_agent(agent)
        p = subprocess.Popen(run_mount(sb, ["/etc/app"], "cat /etc/app/config.yaml; exec sleep 300"),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=run_env(), start_new_session=True)
        sb.procs.append(p)
        try:
            assert read_line(p, RUN_TIMEOUT) == "greeting: hello from the container\n"
            assert our_mounts()  # the command's namespace has it
            assert host_mounts() == []
            helpers = [int(path.split("/")[2]) for path in glob.glob("/proc/[0-9]*/cmdline")
                       if _cmdline(path).startswith("sshfs")]
            assert helpers
            p.kill()  # `ip netns exec` execs in place: this is run
            p.wait()
            assert wait_until(lambda: not our_mounts(), 20), our_mounts()
            assert wait_until(lambda: not any(pid_alive(h) for h in helpers), 10)
            # The agent let go of the container's root and files with the channels.
            assert wait_until(lambda: fds_of_agent(agent) <= fds, 20), (fds, fds_of_agent(agent))
        finally:
            sb.stop(p)
            sb.procs.remove(p)
    assert host_mounts() == []


def test_reads_are_live_also_across_a_configmap_style_symlink_swap(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    """The container rewrites a file and swaps a ConfigMap's `..data` link while the command runs:
    the command sees both (sshfs caches attributes for 1 s; each open reads the pod again)."""
    sb = cluster.sb
    with app_container(sb, big, node_secret[0]) as ctr, pid_agent(sb, ctr.pid):
        app = ctr.root / "etc" / "app"
        (app / "..v1").mkdir()
        (app / "..v1" / "key").write_text("v1\n")
        (app / "..data").symlink_to("..v1")
        (app / "key").symlink_to("..data/key")
        wait = "until grep -qx {want} {file}; do sleep 0.1; done; echo {word}"
        script = " && ".join(["cat /etc/app/config.yaml /etc/app/key", "read go",
                              wait.format(want="v2", file="/etc/app/key", word="SWAPPED"),
                              wait.format(want="edited", file="/etc/app/config.yaml", word="EDITED")])
        p = subprocess.Popen(run_mount(sb, ["/etc/app"], script), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=run_env())
        sb.procs.append(p)
        try:
            assert read_line(p) == "greeting: hello from the container\n"
            assert read_line(p) == "v1\n"
            (app / "..v2").mkdir()
            (app / "..v2" / "key").write_text("v2\n")
            (app / "..data.tmp").symlink_to("..v2")
            (app / "..data.tmp").rename(app / "..data")  # how the kubelet updates a ConfigMap volume
            (app / "config.yaml").write_text("edited\n")
            assert p.stdin is not None
            p.stdin.write(b"\n")
            p.stdin.flush()
            assert read_line(p, 30) == "SWAPPED\n"
            assert read_line(p, 30) == "EDITED\n"
            assert p.wait(RUN_TIMEOUT) == 0
        finally:
            sb.stop(p)
            sb.procs.remove(p)


@contextlib.contextmanager
def through_relay(sb: Sandbox, script: str, grace: float) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """`run -v --mount /etc/app -- sh -c script` through test_resume's relay to a --pid agent with
    this grace period. Yields the run and its relays (the test kills them and appends the ones it
    starts again); whatever is left of them is stopped at the end, also on failure."""
    with app_container(sb, bytes(16), "/nonexistent") as ctr, pid_agent(sb, ctr.pid, resume_timeout=grace):
        relays = [start_relay(sb, AGENT)]
        argv = run_mount(sb, ["/etc/app"], script)
        argv[argv.index("--agent") + 1] = f"{LAPTOP_ADDR}:{RELAY_PORT}"
        argv.insert(argv.index("--agent"), "-v")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env())
        sb.procs.append(p)
        try:
            yield p, relays
        finally:
            sb.stop(p)
            sb.procs.remove(p)
            for relay in relays:
                if relay in sb.procs:
                    kill(sb, relay)


def test_the_mounts_are_served_again_after_a_reconnect(cluster: Cluster) -> None:
    """The SSH connection drops and `run` resumes over a new one: the mount works again, a read
    made during the outage waits for it, and a file held open across it goes on being read."""
    sb = cluster.sb
    flag = os.path.join(sb.dir, "flag-")
    script = (f"cat /etc/app/config.yaml; exec 3</etc/app/big.bin; echo ready; "
              f"until [ -e {flag}outage ]; do sleep 0.1; done; "
              f"cat /etc/app/own-link > {flag}during & "  # blocks until the resume
              f"until [ -e {flag}back ]; do sleep 0.1; done; wait $!; "
              f"cat {flag}during /etc/app/config.yaml; md5sum <&3; ls /etc/app/many | wc -l")
    with through_relay(sb, script, GRACE) as (p, relays):
        assert read_line(p) == "greeting: hello from the container\n"
        assert read_line(p) == "ready\n"
        kill(sb, relays[0])
        open(f"{flag}outage", "w").close()
        time.sleep(OUTAGE)
        assert p.poll() is None, "run ended during the outage"
        relays.append(start_relay(sb, AGENT))
        open(f"{flag}back", "w").close()
        out, err = p.communicate(timeout=RUN_TIMEOUT * 2)
    text = err.decode()
    assert p.returncode == 0, text
    assert out.decode().splitlines() == ["greeting: hello from the container"] * 2 + [
        f"{hashlib.md5(bytes(16)).hexdigest()}  -", str(FILES)], text
    assert text.count("reconnecting") == 1 and " resumed" in text, text
    assert "Traceback" not in text
    assert host_mounts() == []
    assert wait_until(lambda: not our_mounts(), 10), our_mounts()
    assert_clean(sb)


def test_a_read_waiting_past_the_grace_period_ends_with_the_session(cluster: Cluster) -> None:
    """No resume comes: the read that waits on the mount does not outlive `run`, which exits 2."""
    sb = cluster.sb
    outage = os.path.join(sb.dir, "outage")
    script = f"cat /etc/app/config.yaml; until [ -e {outage} ]; do sleep 0.1; done; exec cat /etc/app/own-link"
    with through_relay(sb, script, SHORT_GRACE) as (p, relays):
        assert read_line(p) == "greeting: hello from the container\n"
        kill(sb, relays[0])
        open(outage, "w").close()
        out, err = p.communicate(timeout=RUN_TIMEOUT * 2)
    text = err.decode()
    assert p.returncode == 2, text
    assert out == b"" and "cannot resume the session" in text and "Traceback" not in text, text
    assert wait_until(lambda: not our_mounts(), 10), our_mounts()
    assert_clean(sb, timeout=SHORT_GRACE + 20)


def test_the_service_account_token_appears_where_the_pod_has_it(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    """/var/run/secrets/... exists on no laptop: /run is shadowed in the command's namespace (its
    entries bound back), the token is there, and this machine's /run stays as it was."""
    sb = cluster.sb
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = f"token-{secrets.token_hex(8)}"
    assert not os.path.lexists(sa)
    with app_container(sb, big, node_secret[0]) as ctr, pid_agent(sb, ctr.pid):
        (ctr.root / "var").mkdir()
        (ctr.root / "var" / "run").symlink_to("/run")  # as in most images
        (ctr.root / "run" / "secrets" / "kubernetes.io" / "serviceaccount").mkdir(parents=True)
        (ctr.root / "run" / "secrets" / "kubernetes.io" / "serviceaccount" / "token").write_text(token)
        out = mrd(sb, [sa], f"cat {sa}/token; echo; ls /run/netns | grep -qx {sb.ns('laptop')} && echo RUN-OK")
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == f"{token}\nRUN-OK\n"
    assert not os.path.lexists(sa)
    assert not os.path.lexists("/run/secrets")


def _cmdline(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_missing_path_is_one_line_and_exit_2_before_the_command(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    sb = cluster.sb
    with app_container(sb, big, node_secret[0]) as ctr, pid_agent(sb, ctr.pid):
        for path, why in (("/etc/nope", "no such directory in the container"),
                          ("/etc/app/config.yaml", "not a directory in the container")):
            out = mrd(sb, [path], "echo STARTED")
            err = out.stderr.decode()
            assert out.returncode == 2
            assert out.stdout == b""
            assert len(err.splitlines()) == 1 and why in err, err
        # A command under a mount: exec would walk the FUSE mount while `run` waits for it. Refused.
        argv = run_mount(sb, ["/etc/app"], "")
        out = subprocess.run(argv[:argv.index("--") + 1] + ["/etc/app/config.yaml"], capture_output=True,
                             env=run_env(), timeout=RUN_TIMEOUT)
        err = out.stderr.decode()
        assert out.returncode == 2 and len(err.splitlines()) == 1 and "is under --mount /etc/app" in err, err
    assert_clean(sb)


def test_an_agent_without_a_container_serves_no_files(cluster: Cluster) -> None:
    sb = cluster.sb
    argv = sb.run_args("echo", "STARTED")
    at = argv.index("--")
    out = subprocess.run(argv[:at] + ["--mount", "/etc"] + argv[at:], capture_output=True, env=run_env(),
                         timeout=RUN_TIMEOUT)
    err = out.stderr.decode()
    assert out.returncode == 2 and out.stdout == b""
    assert len(err.splitlines()) == 1 and "serves no files" in err, err
    assert_clean(sb)


SFTP = """
import asyncio, sys
import asyncssh
from mirrord_tun.connect import load_keys

async def main() -> None:
    key, pinned = load_keys(sys.argv[2], sys.argv[3])
    host, port = sys.argv[1].rsplit(":", 1)
    async with asyncssh.connect(host, int(port), username="x", client_keys=[key], known_hosts=([pinned], [], []),
                                agent_path=None, config=None) as conn, conn.start_sftp_client() as sftp:
        attempts = {
            "write": lambda: sftp.open("/etc/app/config.yaml", "r+b"),
            "create": lambda: sftp.open("/etc/app/new", "wb"),
            "mkdir": lambda: sftp.mkdir("/etc/app/d"),
            "remove": lambda: sftp.remove("/etc/app/config.yaml"),
            "rename": lambda: sftp.rename("/etc/app/config.yaml", "/etc/app/x"),
            "symlink": lambda: sftp.symlink("/", "/etc/app/root"),
            "chmod": lambda: sftp.chmod("/etc/app/config.yaml", 0o777),
            "abs-link": lambda: sftp.stat("/etc/app/abs-link"),
            "dotdot": lambda: sftp.stat("/../../../../" + sys.argv[4]),
        }
        for name, attempt in attempts.items():
            try:
                await attempt()
                print(name, "ALLOWED")
            except asyncssh.SFTPError as e:
                print(name, "refused", e.code)
        print("realpath", (await sftp.realpath("/etc/app/../app/./abs-link")))
        print("readlink", (await sftp.readlink("/etc/app/own-link")))
asyncio.run(main())
"""


def test_the_agent_itself_refuses_writes_and_escapes(cluster: Cluster, big: bytes,
                                                     node_secret: tuple[str, str]) -> None:
    """Past the local read-only mount, straight at the agent's SFTP: every write is refused, a
    symlink or `..` out of the container finds nothing, realpath names no node path."""
    sb = cluster.sb
    node_path, secret = node_secret
    with app_container(sb, big, node_path) as ctr, pid_agent(sb, ctr.pid):
        out = subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-c", SFTP, AGENT,
                              sb.keys.identity, sb.keys.host_pub, node_path],
                             capture_output=True, text=True, env=run_env(), timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert "ALLOWED" not in out.stdout and secret not in out.stdout, out.stdout
        assert "realpath /etc/app/abs-link\n" in out.stdout
        assert "readlink /etc/app/config.yaml\n" in out.stdout
        assert sorted(os.listdir(ctr.root / "etc" / "app")) == sorted(
            ["config.yaml", "big.bin", "many", "abs-link", "rel-link", "dir-link", "own-link", "private"])
        assert oct(os.stat(ctr.root / "etc" / "app" / "config.yaml").st_mode & 0o777) == "0o644"


VOLUMES = """
import asyncio, sys
from mirrord_tun.connect import load_keys
from mirrord_tun.mounts import Mounts
from mirrord_tun.run import LocalSession

async def main() -> int:
    session = LocalSession(sys.argv[4:], sys.argv[1], *load_keys(sys.argv[2], sys.argv[3]))
    session.mounts = Mounts([], ["/etc", "/etc/app"])  # as `run --target` gives the pod's volumes
    return await session.run()
sys.exit(asyncio.run(main()))
"""


def test_the_targets_volumes_never_cover_this_machines_files(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    """A volume over a non-empty local directory (/etc) is left out with one warning line;
    one where this machine has nothing (/etc/app) is mounted."""
    sb = cluster.sb
    with app_container(sb, big, node_secret[0]) as ctr, pid_agent(sb, ctr.pid):
        out = subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-c", VOLUMES, AGENT,
                              sb.keys.identity, sb.keys.host_pub, "sh", "-c",
                              "cat /etc/app/config.yaml; test -e /etc/os-release && echo LOCAL-ETC"],
                             capture_output=True, text=True, env=run_env(), timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "greeting: hello from the container\nLOCAL-ETC\n"
        assert "not mounting the target's volumes at /etc (not in a directory of its own under /etc, " in out.stderr
    assert_clean(sb)


def test_volume_mount_paths_picks_config_secret_projected_and_downward_api() -> None:
    from kubernetes import client

    volumes = [client.V1Volume(name="cfg", config_map=client.V1ConfigMapVolumeSource(name="c")),
               client.V1Volume(name="sec", secret=client.V1SecretVolumeSource(secret_name="s")),
               client.V1Volume(name="kube-api-access-x", projected=client.V1ProjectedVolumeSource(sources=[])),
               client.V1Volume(name="info", downward_api=client.V1DownwardAPIVolumeSource(items=[])),
               client.V1Volume(name="data", empty_dir=client.V1EmptyDirVolumeSource()),
               client.V1Volume(name="pvc", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                   claim_name="p"))]
    mounts = [client.V1VolumeMount(name="cfg", mount_path="/etc/config"),
              client.V1VolumeMount(name="sec", mount_path="/etc/secret", read_only=True),
              client.V1VolumeMount(name="kube-api-access-x",
                                   mount_path="/var/run/secrets/kubernetes.io/serviceaccount"),
              client.V1VolumeMount(name="info", mount_path="/etc/podinfo"),
              client.V1VolumeMount(name="cfg", mount_path="/app/one.yaml", sub_path="one.yaml"),  # a file
              client.V1VolumeMount(name="data", mount_path="/data"),
              client.V1VolumeMount(name="pvc", mount_path="/var/lib/db")]
    pod = client.V1Pod(spec=client.V1PodSpec(volumes=volumes, containers=[
        client.V1Container(name="app", volume_mounts=mounts),
        client.V1Container(name="sidecar", volume_mounts=[client.V1VolumeMount(name="sec", mount_path="/s")])]))
    assert volume_mount_paths(pod, "app") == ["/etc/config", "/etc/podinfo", "/etc/secret",
                                              "/var/run/secrets/kubernetes.io/serviceaccount"]
    assert volume_mount_paths(pod, "sidecar") == ["/s"]
    assert volume_mount_paths(pod, "other") == []
    assert volume_mount_paths(SimpleNamespace(spec=SimpleNamespace(volumes=None, containers=None)), "app") == []


def test_the_help_says_attach_and_sidecar_do_not_mount() -> None:
    out = subprocess.run([sys.executable, "-m", "mirrord_tun", "run", "--help"], capture_output=True, text=True,
                         env=run_env())
    assert "Not for attach or sidecar" in " ".join(out.stdout.split())


READLINKS = """
import asyncio, sys
import asyncssh
from mirrord_tun.connect import load_keys

async def main() -> None:
    key, pinned = load_keys(sys.argv[2], sys.argv[3])
    host, port = sys.argv[1].rsplit(":", 1)
    async with asyncssh.connect(host, int(port), username="x", client_keys=[key], known_hosts=([pinned], [], []),
                                agent_path=None, config=None) as conn, conn.start_sftp_client() as sftp:
        for path in sys.argv[4:]:
            try:
                print(path, "ANSWERED", await sftp.readlink(path))
            except asyncssh.SFTPError as e:
                print(path, "refused", e.code, e.reason)
asyncio.run(main())
"""


def test_proc_magic_links_never_name_a_node_path(cluster: Cluster, big: bytes) -> None:
    """The container has its own /proc: readlink of its root, cwd, exe and fd links (which the
    kernel prints as the agent sees them: node paths) is refused; an ordinary link still answers."""
    sb = cluster.sb

    def setup(root: Path) -> None:
        (root / "etc").mkdir()
        (root / "etc" / "link").symlink_to("/etc/target")

    with container(sb, sb.ns("pod"), setup, with_proc=True) as ctr, pid_agent(sb, ctr.pid):
        links = [f"/proc/{p}/{name}" for p in (1, ctr.pid, "self", "thread-self")
                 for name in ("root", "cwd", "exe", "fd/0", "fd/1", "ns/net")] + ["/proc/self", "/proc/mounts"]
        out = subprocess.run(["ip", "netns", "exec", sb.ns("laptop"), sys.executable, "-c", READLINKS, AGENT,
                              sb.keys.identity, sb.keys.host_pub, *links, "/etc/link"],
                             capture_output=True, text=True, env=run_env(), timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[-1] == "/etc/link ANSWERED /etc/target"
        assert [line for line in lines[:-1] if "ANSWERED" in line] == []
        assert str(ctr.root) not in out.stdout and sb.dir not in out.stdout


def test_a_container_link_never_leads_to_a_laptop_file_through_the_mount(
        cluster: Cluster, big: bytes, node_secret: tuple[str, str]) -> None:
    """The node is this laptop here: abs-link and rel-link name a file that exists on the laptop
    and not in the container. Through sshfs they are neither read nor shown as links out."""
    sb = cluster.sb
    node_path, secret = node_secret
    with app_container(sb, big, node_path) as ctr, pid_agent(sb, ctr.pid):
        script = ("for f in abs-link rel-link dir-link; do readlink /etc/app/$f && echo LINK $f; "
                  "cat /etc/app/$f/ /etc/app/$f; done; ls -la /etc/app/ /etc/app/dir-link/; "
                  "find -L /etc/app -maxdepth 1 -type f | sort; readlink /etc/app/own-link; cat /etc/app/own-link")
        out = mrd(sb, ["/etc/app"], script)
        text = out.stdout.decode() + out.stderr.decode()
        assert secret not in text and node_path not in text and "LINK" not in text, text
        assert out.stdout.decode().endswith("greeting: hello from the container\n"), text


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)


def _packet(kind: int, req_id: int, *fields: bytes) -> bytes:
    body = bytes([kind]) + req_id.to_bytes(4, "big") + b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("link,target,seen", [
    (b"/etc/app/a", b"/home/me/.ssh/id_ed25519", None),  # absolute, to a laptop file
    (b"/etc/app/a", b"../../../../../etc/shadow", None),  # relative, climbing out
    (b"/etc/app/d/a", b"../../passwd", None),
    (b"/etc/app/a", b"//etc/app/../shadow", None),
    (b"/etc/app/d/a", b"/etc/app/config.yaml", b"../config.yaml"),  # inside: relative, stays inside
    (b"/etc/app/d/a", b"s/../../x/./y", b"../x/y"),  # normalized: no `..` after a name
    (b"/etc/app/a", b"/etc/app", b"."),
])
def test_the_relay_never_hands_the_kernel_a_link_out_of_the_mount(link: bytes, target: bytes,
                                                                  seen: bytes | None) -> None:
    """A hostile agent (or container) answers READLINK with a path this machine's kernel would
    follow to a laptop file: sshfs gets ENOENT instead, or the same place as a path inside the mount."""
    from mirrord_tun.sftprelay import SftpRelay

    relay = SftpRelay("/etc/app")
    relay.transport, relay.chan, relay._ready = _Pipe(), _Pipe(), True  # type: ignore[assignment]
    relay.from_sshfs(_packet(19, 7, link))  # READLINK from sshfs
    assert relay.chan.sent  # type: ignore[union-attr]
    name = bytes([104]) + (7).to_bytes(4, "big") + (1).to_bytes(4, "big") + _packet(0, 0, target, target)[9:]
    relay.from_server(len(name + bytes(4)).to_bytes(4, "big") + name + bytes(4))  # NAME, one entry, no attrs
    [answer] = relay.transport.sent  # type: ignore[union-attr]
    if seen is None:
        assert answer[4] == 101 and int.from_bytes(answer[9:13], "big") == 2  # STATUS, no such file
    else:
        assert answer[4] == 104 and answer[13:17] == len(seen).to_bytes(4, "big") and answer[17:17 + len(seen)] == seen


def test_a_volume_whose_mount_point_would_shadow_root_is_left_out() -> None:
    # A pod's ConfigMap at /config: making /config here would mean a tmpfs over /, which
    # mirrord-ns never does; run then warns and goes on (found on a real cluster).
    from mirrord_tun.mounts import _placeable

    assert not _placeable("/mrd-test-no-such-dir/config")
    assert _placeable("/etc/mrd-test-no-such-dir/config")
    assert _placeable("/etc")


def test_the_end_of_a_session_says_nothing_about_its_mounts(cluster: Cluster, node_secret: tuple[str, str]) -> None:
    # On a real cluster every `run -- true` ended with sshfs's "read: Interrupted system call",
    # once per mounted volume: the sshfs we stop is not the user's business.
    sb = cluster.sb
    with app_container(sb, b"", node_secret[0]) as ctr, pid_agent(sb, ctr.pid):
        out = mrd(sb, ["/etc/app"], "true")
    assert out.returncode == 0, out.stderr
    assert out.stderr.decode() == "", out.stderr
