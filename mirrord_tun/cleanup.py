"""`mirrord-ns cleanup`: remove what crashed sessions left, wherever this machine can reach.

Each half is skipped with a note rather than failing when it cannot run (no
kubeconfig, no kubernetes client installed, not root), so the command is always
safe to try. Sessions that are still running are never touched: agent objects
are picked by this user's labels and left while their agent runs, nft tables only when their owning agent is dead,
demo sandboxes only when the process that made them is gone.
"""
from __future__ import annotations

import glob
import logging
import os

log = logging.getLogger("mirrord-ns")


def clean_cluster(context: str | None, kubeconfig: str | None, namespace: str | None) -> list[str]:
    try:
        from mirrord_tun.kube.cleanup import delete_agents
        from mirrord_tun.kube.cluster import connect
        from mirrord_tun.kube.errors import KubeError
        from mirrord_tun.kube.manifest import current_user
    except ImportError:
        log.warning("the kubernetes client is not installed (pip install 'mirrord-ns[kubernetes]'); "
                    "skipping the cluster")
        return []
    try:
        cluster = connect(context, kubeconfig, namespace)
        try:
            return delete_agents(cluster, current_user(), all_namespaces=namespace is None)
        except KubeError as e:
            if namespace is not None or e.status != 403:
                raise
            log.warning("may not list every namespace; cleaning namespace %s only", cluster.namespace)
            return delete_agents(cluster, current_user(), all_namespaces=False)
    except KubeError as e:
        log.warning("skipping the cluster: %s", e)
        return []


def clean_host() -> list[str]:
    """Sandboxes of dead `demo`s; resolver files a killed attach left rewritten; nft tables of
    dead agents in this namespace and every named one; stale run files."""
    if os.geteuid() != 0:
        log.warning("not root: skipping this host's namespaces")
        return []
    from mirrord_tun.agent.guard import sweep
    from mirrord_tun.netns.resolvconf import restore_leftovers
    from mirrord_tun.command import remove_stale_resolv_files
    from mirrord_tun.sandbox import remove_stale

    removed = remove_stale() + restore_leftovers(log.warning) + remove_stale_resolv_files()
    for path in ["/proc/self/ns/net", *sorted(glob.glob("/run/netns/*"))]:
        try:
            removed += [f"nft table {t} in {path}" for t in sweep(path)]
        except Exception as e:  # noqa: BLE001 - one odd namespace must not stop the rest
            log.warning("cannot clean %s: %s", path, e)
    return removed
