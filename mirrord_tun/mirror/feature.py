"""The inbound mirror as a session feature: which pod addresses it can take, and MIRROR frames.

`mirror_feature` decides from the agent's WELCOME whether a session mirrors at all (an agent
too old, a pod without addresses, a namespace that cannot hold them); `MirrorFeature` plugs the
`Mirror` (this package's __init__) into the link.
"""
from __future__ import annotations

import logging
from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.feature import Feature, Handler
from mirrord_tun.mirror import Mirror
from mirrord_tun.netns import ipv6
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.protocol import AgentMsg
from mirrord_tun.pump import Counters

log = logging.getLogger("mirrord-ns")


class MirrorFeature(Feature):
    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror

    def frames(self) -> dict[int, Handler]:
        return {AgentMsg.MIRROR: self.mirror.deliver}

    async def start(self) -> None:
        await self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()


def mirror_feature(ns: NetNs, welcome: protocol.Welcome, ports: dict[int, int], exclude: set[str],
                   send: Callable[[bytes], None], counters: Counters, spill_limit: int) -> MirrorFeature | None:
    """The session's mirror of `ports` (pod port -> local port), or None where it cannot mirror."""
    if welcome.version < protocol.MIRROR_VERSION:
        log.warning("the agent speaks protocol %d, too old to mirror inbound traffic", welcome.version)
        return None
    if not welcome.pod_addrs:
        return None
    addrs = mirrorable(welcome.pod_addrs + welcome.pod_addrs6, exclude, ns.call(ipv6.enabled))
    if not addrs:
        return None
    own = [*welcome.pod_addrs, *welcome.pod_addrs6, *welcome.client_addrs, welcome.agent_addr, welcome.agent_addr6]
    return MirrorFeature(Mirror(ns, addrs, own, ports, send, counters, spill_limit))


def mirrorable(pod_addrs: list[str], exclude: set[str], local_ipv6: bool) -> list[str]:
    """The pod addresses the mirror can make local here (not those in `exclude`); one clear warning
    for the others, whose copies are then dropped and counted (dropped_mirror_destination)."""
    addrs = [a for a in pod_addrs if a not in exclude]
    if len(addrs) < len(pod_addrs):
        log.warning("not mirroring traffic to %s: it is the agent's address, which must stay reachable "
                    "from this namespace", ", ".join(sorted(set(pod_addrs) - set(addrs))))
    if not local_ipv6 and any(":" in a for a in addrs):  # an attached container with IPv6 off
        log.warning("not mirroring the pod's IPv6 clients: IPv6 is disabled in this namespace")
        addrs = [a for a in addrs if ":" not in a]
    return addrs
