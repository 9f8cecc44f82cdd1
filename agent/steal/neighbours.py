"""Ports that other agents' sessions steal in this namespace: on Kubernetes every `run` has an agent of its own.

The Registry (rules.py) knows this agent's sessions only. Another agent working for the same pod
keeps its own session tables here (dataplane.py: `mirrord_ns_<sid>`, its owner in the comment),
and of two tables that DNAT or redirect a port, the first chain wins: a second steal took the
port from the first without a word, and two agents' filtered steals cannot share one (each
proxy sends what its own filter does not match to the pod). So a port that a live table of
another agent steals, whole or filtered, is refused, naming that session. Two agents starting
to steal the same port at the same moment can still both get it: the tables are the only
shared record, and nft has no compare-and-set across tables.
"""
from __future__ import annotations

import re

from mirrord_tun.agent import owner
from mirrord_tun.netns import nft

# dataplane.TABLE_PREFIX's session tables (dataplane imports this package: not imported from there).
_TABLE = re.compile(r"^table ip mirrord_ns_([0-9a-f]+) {\n(.*?)^}", re.M | re.S)
_OWNER = re.compile(r'comment "owner=(\S+)')
# A map's elements: "8080 timeout 10s expires 8s968ms : 32899, 9090 ...", with no braces inside.
_MAP = re.compile(r"map (steal_tcp|steal_udp|filter_tcp) {[^{}]*?(?:elements = {([^{}]*)})?[^{}]*}")
_PROTO = {"steal_tcp": "tcp", "steal_udp": "udp", "filter_tcp": "tcp"}


def stolen_elsewhere() -> dict[str, str]:
    """In the namespace: "tcp/PORT" or "udp/PORT" -> the session that another live agent steals it for."""
    me = owner.me()
    out: dict[str, str] = {}
    for sid, body in _TABLE.findall(nft.ruleset("ip")):
        holder = _OWNER.search(body)
        if holder is None or holder[1] == me or not owner.alive(holder[1]):
            continue  # ours (the Registry's business), or a dead agent's whose elements expire
        for kind, elements in _MAP.findall(body):
            for element in filter(None, (e.strip() for e in elements.split(","))):
                out[f"{_PROTO[kind]}/{element.split()[0]}"] = sid
    return out
