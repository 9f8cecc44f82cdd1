"""The agent's end when its pod is deleted: the pod's namespace outlives the pod while we hold it.

When a pod is deleted, its network plugin removes the pod's interface (and so its addresses)
from the namespace, but the namespace itself lives on as long as the agent holds it open: a
session would go on carrying the command's packets into a namespace that reaches nothing,
and the user would see only timeouts. So the agent watches for the namespace's own addresses
(every one but loopback's and our TUNs') to be gone, then ends every session saying why, and
exits. A namespace that never had an address of its own (a bare test namespace) is not watched.
"""
from __future__ import annotations

import asyncio
import logging

from mirrord_tun.agent.dataplane import TUN_PREFIX
from mirrord_tun.netns import ipv6, links
from mirrord_tun.netns.namespace import NetNs

log = logging.getLogger("mirrord-ns.agent")
CHECK_INTERVAL = 2.0  # seconds; a look at the namespace's addresses costs a thread hop and a netlink dump
POD_GONE = "the pod's network is gone (the pod was deleted or its sandbox torn down)"


def own_addresses() -> list[str]:
    """In the namespace: its addresses other than loopback's and our TUNs'."""
    return links.ipv4_addresses(exclude_prefix=TUN_PREFIX) + ipv6.global_addresses(exclude_prefix=TUN_PREFIX)


async def wait_until_gone(ns: NetNs, interval: float = CHECK_INTERVAL) -> None:
    """Return once the namespace, which had addresses of its own, has none left; never if it had none."""
    if not await _addresses(ns):
        await asyncio.Event().wait()
    while (await _addresses(ns)) != []:
        await asyncio.sleep(interval)
    log.warning("%s: ending every session and exiting", POD_GONE)


async def _addresses(ns: NetNs) -> list[str] | None:
    """own_addresses(), or None when netlink did not say (not a reason to end anything)."""
    try:
        return await ns.acall(own_addresses)
    except OSError as e:
        log.debug("cannot list the pod's addresses: %s", e)
        return None
