"""Nothing is left behind: after a clean session, a vanished client, or a dead agent.

"Left behind" means, in the pod namespace, an mrd* TUN, a mirrord_ns_ nft table or
ip_forward not back at 0 (see conftest.leftovers); on the laptop, the command's
processes, its namespace, or a mount in ours.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import (CLEAN_TIMEOUT, Cluster, assert_clean, children, finish, kill_pids, leftovers, mrd_run,
                      pid_alive, pids_in_netns, read_line, start_run, wait_until)
from mirrord_tun.sandbox import SANDBOX_RESUME_TIMEOUT

DEAD_AGENT_BOUND = 20  # issue 2: `run` exits within 20 s of the agent dying
# issue 11: when the connection merely went silent, plus the agent's grace period for a resume.
SILENT_AGENT_BOUND = DEAD_AGENT_BOUND + SANDBOX_RESUME_TIMEOUT
# The command reports its namespace, then holds the session open until run stops it.
HOLD = 'trap "echo cmd-terminated; exit 143" TERM; stat -L -c %i /proc/self/ns/net; sleep 60 & wait'


def laptop_links(cluster: Cluster) -> list[str]:
    out = subprocess.run(["ip", "-n", cluster.sb.ns("laptop"), "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return sorted(link["ifname"] for link in json.loads(out))


def our_mounts_mentioning(word: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if word in line]


def test_a_session_leaves_nothing_behind(cluster: Cluster) -> None:
    links_before = laptop_links(cluster)
    # A daemon the command leaves running, and where the command lived.
    r = mrd_run(cluster.sb, "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!; stat -L -c %i /proc/self/ns/net; "
                "curl -sS --max-time 10 -o /dev/null http://svc/")
    assert r.returncode == 0, r.stderr
    daemon, netns = (int(x) for x in r.stdout.split())
    assert not pid_alive(daemon), "the command's background process outlived run"
    assert pids_in_netns(netns) == [], "processes left in the command's namespace"
    assert laptop_links(cluster) == links_before  # the TUN lived in the command's namespace only
    assert our_mounts_mentioning("mirrord-ns-resolv") == []  # resolv.conf was mounted privately
    assert_clean(cluster.sb)


def test_killed_client_agent_cleans_up(cluster: Cluster) -> None:
    """SIGKILL on `run`: its TCP connection closes, the agent tears the session down, the command dies.

    The command gets SIGTERM from the kernel (PR_SET_PDEATHSIG); what it started itself is
    out of a dead run's reach (it would take a PID namespace), so it starts nothing here.
    """
    p = start_run(cluster.sb, "sh", "-c", "stat -L -c %i /proc/self/ns/net; exec sleep 300")
    netns = int(read_line(p))
    assert leftovers(cluster.sb) != []  # the session's state exists while it runs
    p.kill()
    p.wait()
    assert wait_until(lambda: pids_in_netns(netns) == [], CLEAN_TIMEOUT), "command outlived a killed run"
    assert_clean(cluster.sb)


def test_frozen_client_agent_cleans_up_after_keepalive(cluster: Cluster) -> None:
    """A client that goes silent (SIGSTOP: no FIN, no answers) is dropped by keepalive, at most ~15 s."""
    p = start_run(cluster.sb, "sh", "-c", HOLD)
    netns = int(read_line(p))
    assert leftovers(cluster.sb) != []
    p.send_signal(signal.SIGSTOP)
    try:
        assert wait_until(lambda: not leftovers(cluster.sb), 15 + CLEAN_TIMEOUT), leftovers(cluster.sb)
    finally:
        p.send_signal(signal.SIGCONT)
    # Woken up, run finds the tunnel gone, cannot resume (too late), stops the command and says so.
    code, out, err = finish(p, timeout=DEAD_AGENT_BOUND)
    assert code != 0
    assert "cmd-terminated" in out and "cannot resume the session" in err
    assert pids_in_netns(netns) == []


def _session_then_dead_agent(cluster: Cluster, victims: list[int]) -> tuple[int, str, str, int]:
    """Start a held session, SIGKILL `victims` in order, and wait for run; returns its result."""
    p = start_run(cluster.sb, "sh", "-c", HOLD)
    netns = int(read_line(p))
    assert leftovers(cluster.sb) != []
    killed_at = time.monotonic()
    kill_pids(victims)
    code, out, err = finish(p, timeout=DEAD_AGENT_BOUND + 10)
    assert time.monotonic() - killed_at < DEAD_AGENT_BOUND, "run outlived its agent by more than 20 s"
    assert code != 0
    assert "cmd-terminated" in out, "the command was not stopped"
    assert pids_in_netns(netns) == []
    return code, out, err, netns


def test_dead_worker_guard_cleans_up(fresh_cluster: Cluster) -> None:
    """SIGKILL on the agent's worker: no finally runs there, its guard parent removes the tables."""
    guard = fresh_cluster.agent
    [worker] = children(guard.pid)
    _session_then_dead_agent(fresh_cluster, [worker])
    guard.wait(CLEAN_TIMEOUT)  # the guard exits once it has cleaned up
    assert guard.returncode == 128 + signal.SIGKILL  # and reports how its worker died
    assert leftovers(fresh_cluster.sb) == []


def test_dead_agent_next_start_cleans_up(fresh_cluster: Cluster) -> None:
    """SIGKILL on guard and worker: the state stays until the next agent starts and removes it."""
    sb, guard = fresh_cluster.sb, fresh_cluster.agent
    [worker] = children(guard.pid)
    # Guard first: killed second, it could notice the worker's death and clean up itself.
    _session_then_dead_agent(fresh_cluster, [guard.pid, worker])
    assert wait_until(lambda: not pid_alive(worker), CLEAN_TIMEOUT)
    left = leftovers(sb)
    assert any("mirrord_ns_" in item for item in left) and "conf/eth0/forwarding=1" in left, left
    sb.start_agent()  # returns once it prints "listening", i.e. after its start-up cleanup
    assert leftovers(sb) == []
    # The new agent serves as usual.
    r = mrd_run(sb, "echo", "again")
    assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr
    assert_clean(sb)


def test_frozen_agent_run_gives_up_within_keepalive_and_grace(fresh_cluster: Cluster) -> None:
    """An agent that stops answering (SIGSTOP: the TCP connection stays up, as in a network
    partition) is caught by keepalive, then tried again for its grace period; once it wakes up
    it finds the session gone and cleans up."""
    sb, guard = fresh_cluster.sb, fresh_cluster.agent
    [worker] = children(guard.pid)
    p = start_run(sb, "sh", "-c", HOLD)
    netns = int(read_line(p))
    stopped_at = time.monotonic()
    kill_pids([worker], signal.SIGSTOP)
    try:
        code, out, err = finish(p, timeout=SILENT_AGENT_BOUND + 10)
        assert time.monotonic() - stopped_at < SILENT_AGENT_BOUND, "run outlived its agent by more than 25 s"
    finally:
        kill_pids([worker], signal.SIGCONT)
    assert code != 0
    assert "cmd-terminated" in out and "cannot resume the session" in err
    assert pids_in_netns(netns) == []
    assert_clean(sb)


def test_agent_stopped_with_sigterm_ends_the_session_cleanly(fresh_cluster: Cluster) -> None:
    sb, guard = fresh_cluster.sb, fresh_cluster.agent
    p = start_run(sb, "sh", "-c", HOLD)
    netns = int(read_line(p))
    guard.send_signal(signal.SIGTERM)  # the guard passes it on to its worker
    code, out, err = finish(p, timeout=DEAD_AGENT_BOUND)
    assert code != 0 and "cmd-terminated" in out and "lost the tunnel" in err
    assert guard.wait(CLEAN_TIMEOUT) == 0
    assert pids_in_netns(netns) == []
    assert leftovers(sb) == []
