"""The target pod deleted under a session: its network plugin takes the pod's interface out of
the namespace, which lives on while the agent holds it. Found on the real cluster: `run` went
on, its command's connections timing out one by one, and nothing said why."""
from __future__ import annotations

import subprocess

from conftest import RUN_TIMEOUT, Cluster, finish, read_line, start_run


def test_a_deleted_pods_session_ends_with_one_line_saying_so(fresh_cluster: Cluster) -> None:
    sb = fresh_cluster.sb
    p = start_run(sb, "sh", "-c", "echo started; exec sleep 300")
    assert read_line(p) == "started\n"
    # What the CNI plugin does as the pod goes: the pod's end of its veth pair is deleted.
    subprocess.run(["ip", "-n", sb.ns("pod"), "link", "del", "eth0"], check=True)
    code, _, err = finish(p, timeout=RUN_TIMEOUT * 2)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the pod's network is gone" in lines[0], err
    assert lines[0].startswith("mirrord-ns: "), err
    # The agent ended too: it works for a pod that is no more.
    assert fresh_cluster.agent.wait(RUN_TIMEOUT) is not None
