"""Agent additions for Kubernetes: container ID → PID (and never another's), inline keys, idle exit."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import asyncssh
import pytest

from mirrord_tun.agent import keys
from mirrord_tun.agent.containers import find_pid, parse_container_id

CID = "4f2a" * 16


@pytest.mark.parametrize("cgroup", [
    # containerd, systemd cgroup driver (cgroup v2)
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{CID}.scope\n",
    # containerd, cgroupfs driver (cgroup v1)
    f"12:pids:/kubepods/burstable/pod1234/{CID}\n11:memory:/kubepods/burstable/pod1234/{CID}\n",
    # CRI-O
    f"0::/kubepods.slice/kubepods-pod1234.slice/crio-{CID}.scope\n",
    # docker
    f"0::/system.slice/docker-{CID}.scope\n",
    f"4:memory:/docker/{CID}\n",
])
def test_container_pid_from_cgroup_any_runtime(tmp_path, cgroup: str) -> None:  # type: ignore[no-untyped-def]
    def proc(pid: int, text: str) -> None:
        os.makedirs(tmp_path / str(pid))
        (tmp_path / str(pid) / "cgroup").write_text(text)

    proc(1, "0::/init.scope\n")
    proc(40, f"0::/kubepods.slice/cri-containerd-{'0' * 64}.scope\n")  # another container
    proc(77, f"0::/kubepods.slice/cri-containerd-{CID}1.scope\n")  # a longer ID is not ours
    proc(310, cgroup)
    proc(312, cgroup)  # a second process of the container: the first one wins
    for scheme in ("containerd://", "cri-o://", "docker://", ""):
        assert find_pid(scheme + CID, proc=str(tmp_path)) == 310


def test_the_containers_init_not_its_lowest_pid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After the node's PIDs wrapped, a process the container forked later has a lower PID than its
    init (and may have made namespaces of its own): the init is PID 1 of its namespace, else the one
    whose parent (the runtime's shim) is outside the container."""
    cgroup = f"0::/kubepods.slice/cri-containerd-{CID}.scope\n"

    def proc(pid: int, ppid: int, nspid: str) -> None:
        os.makedirs(tmp_path / str(pid))
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nPPid:\t{ppid}\nNSpid:\t{nspid}\n")

    proc(205, 310, "205 7")  # forked by the init after the wrap
    proc(310, 300, "310 1")  # the init; 300 is the shim
    proc(402, 300, "402 9")  # a `kubectl exec`: its parent is the shim too
    assert find_pid(CID, proc=str(tmp_path)) == 310
    for pid, ppid in ((205, 310), (310, 300), (402, 300)):  # in the node's PID namespace: no NSpid 1
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nPPid:\t{ppid}\nNSpid:\t{pid}\n")
    assert find_pid(CID, proc=str(tmp_path)) == 310


# In a PID namespace of its own (with its own /proc), where ns_last_pid is that namespace's: the
# target exits and a process of another root takes its PID, as a node may hand it out.
_REUSED_PID = textwrap.dedent("""
    import errno, os, subprocess, sys
    from mirrord_tun.agent import fsview
    from mirrord_tun.agent.containers import Process
    from mirrord_tun.agent.files import reader_of
    from mirrord_tun.agent.target import resolve

    target = subprocess.Popen(["sleep", "60"])
    held = Process.hold(target.pid)
    fsview.open_view(held, frozenset()).close()  # while it lives: served
    target.kill(); target.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target.pid - 1))
    other = subprocess.Popen(["unshare", "--mount", "--net", "sleep", "60"])  # the node's next process
    assert other.pid == target.pid, (other.pid, target.pid)
    outcomes = []
    for attempt in (lambda: fsview.open_view(held, frozenset()), lambda: reader_of(held),
                    lambda: resolve(None, held, None)):
        try:
            attempt()
            outcomes.append("served")
        except ProcessLookupError as e:
            outcomes.append(f"gone {e.errno == errno.ESRCH}: {e.strerror}")
        except ValueError as e:
            outcomes.append(f"refused: {e}")
    other.kill()
    print(*outcomes, sep=chr(10))
    fds = os.listdir("/proc/self/fd")
    print("fds", len(fds))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a PID namespace)")
def test_a_reused_pid_is_never_taken_for_the_target() -> None:
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _REUSED_PID],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    gone, status, netns, fds = r.stdout.splitlines()
    assert gone == "gone True: the target container's process has exited (the container restarted?): " \
                   "its files are no longer served"
    assert status == gone and netns.startswith("refused: the target container's process has exited")
    assert fds == "fds 5"  # 0-2, the listing's own, the pidfd: no view left open by the refusals


def test_container_not_found_and_bad_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no process of container 4f2a4f2a4f2a"):
        find_pid("containerd://" + CID, proc=str(tmp_path))
    for bad in ("containerd://", "containerd://xyz", "../etc"):
        with pytest.raises(ValueError, match="not a container ID"):
            parse_container_id(bad)


def test_keys_inline_or_file_exactly_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pub = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    assert keys.authorized(None, pub) is not None
    path = tmp_path / "k.pub"
    path.write_text(pub)
    assert keys.authorized(str(path), None) is not None
    for args in ((None, None), (str(path), pub)):
        with pytest.raises(ValueError, match="exactly one"):
            keys.authorized(*args)
    with pytest.raises(ValueError, match="bad authorized key"):
        keys.authorized(None, "ssh-ed25519 not-base64!")
    assert keys.host_key(None).algorithm == b"ssh-ed25519"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_launched_agent_prints_an_ephemeral_host_key_and_exits_when_idle() -> None:
    name = f"mrdka{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        pub = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        began = time.monotonic()
        # Nobody connects: the agent must be gone about 2 s after it started listening.
        r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "mirrord_tun", "agent",
                            "--listen", "127.0.0.1:2222", "--authorized-key-data", pub, "--idle-exit", "2"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "listening on 127.0.0.1:2222" in r.stdout and " host-key ssh-ed25519 AAAA" in r.stdout
        assert time.monotonic() - began < 12
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
