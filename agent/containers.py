"""Find a container's processes on the node from its runtime container ID.

Kubernetes reports `containerd://<id>`, `cri-o://<id>` or `docker://<id>`; each
runtime puts the ID into the cgroup path of every process of the container,
under either cgroup driver:

    containerd  .../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
                /kubepods/burstable/pod<uid>/<id>
    CRI-O       .../crio-<id>.scope         /kubepods/.../crio-<id>
    docker      .../docker-<id>.scope       /docker/<id>

So the runtime does not matter: the ID as a whole path component (optionally
with a runtime prefix and `.scope`) in /proc/PID/cgroup names the container.
The agent runs with hostPID, so /proc shows every process of the node.
"""
from __future__ import annotations

import os
import re

_ID = re.compile(r"^[0-9a-f]{12,64}$")


def parse_container_id(value: str) -> str:
    """`containerd://abc…` → `abc…`; a bare ID passes through."""
    ident = value.rpartition("://")[2].strip().lower()
    if not _ID.match(ident):
        raise ValueError(f"not a container ID: {value!r} (expected RUNTIME://HEX as in the pod status)")
    return ident


def _mentions(cgroup_text: str, ident: str) -> bool:
    # A component equal to the ID, or ending in "-ID" / "-ID.scope" (runtime prefixes vary).
    component = re.compile(rf"(?:^|[/-]){ident}(?:\.scope)?(?:/|$)")
    # Lines are "hierarchy:controllers:path" (cgroup v1 and v2 alike).
    return any(component.search(line.split(":", 2)[-1]) for line in cgroup_text.splitlines())


def find_pid(container_id: str, proc: str = "/proc") -> int:
    """The oldest (lowest) PID in the container: its init, which every exec'd process shares namespaces with."""
    ident = parse_container_id(container_id)
    for entry in sorted((e for e in os.listdir(proc) if e.isdigit()), key=int):
        try:
            with open(os.path.join(proc, entry, "cgroup")) as f:
                text = f.read()
        except OSError:  # exited while we looked, or a kernel thread we may not read
            continue
        if _mentions(text, ident):
            return int(entry)
    raise ValueError(f"no process of container {ident[:12]} under {proc}: is the agent running "
                     f"on the target's node with hostPID?")
