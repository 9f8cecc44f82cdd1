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

A PID is only a number: once its process exits (the container restarts), the node may give it
to any other process, whose /proc/PID/root and namespaces are not the container's. So the agent
holds the target by a pidfd (`Process`) and checks it after opening anything through /proc/PID.
"""
from __future__ import annotations

import errno
import os
import re
import signal
from dataclasses import dataclass

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


def _in_container(proc: str, pid: int, ident: str) -> bool:
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            return _mentions(f.read(), ident)
    except OSError:  # exited while we looked, or a kernel thread we may not read
        return False


def _status(proc: str, pid: int) -> dict[str, list[str]]:
    try:
        with open(os.path.join(proc, str(pid), "status")) as f:
            return {key: value.split() for key, _, value in (line.partition(":") for line in f)}
    except OSError:
        return {}


def find_pid(container_id: str, proc: str = "/proc") -> int:
    """The container's init, which every exec'd process shares namespaces with: PID 1 of its own PID
    namespace, else a process whose parent is outside the container (the runtime's shim), lowest PID
    first. Not merely the lowest PID: after the node's PIDs wrap around, a process the container
    forked later (perhaps into namespaces of its own making) can have a lower one."""
    ident = parse_container_id(container_id)
    pids = sorted(int(e) for e in os.listdir(proc) if e.isdigit())
    members = [pid for pid in pids if _in_container(proc, pid, ident)]
    if not members:
        raise ValueError(f"no process of container {ident[:12]} under {proc}: is the agent running "
                         f"on the target's node with hostPID?")

    def rank(pid: int) -> tuple[bool, bool, int]:
        status = _status(proc, pid)
        first = status.get("NSpid", [""])[-1] == "1"
        outside = status.get("PPid", [""])[0].isdigit() and int(status["PPid"][0]) not in members
        return not first, not outside, pid
    return min(members, key=rank)


GONE = "the target container's process has exited (the container restarted?): its files are no longer served"


@dataclass(frozen=True)
class Process:
    """The target process, held by a pidfd so that its PID is never taken for whatever has it next."""

    pid: int
    pidfd: int

    @classmethod
    def hold(cls, pid: int, container_id: str | None = None) -> Process:
        """ValueError (one line) if `pid` is no process, or no longer `container_id`'s."""
        try:
            held = cls(pid, os.pidfd_open(pid))
        except ProcessLookupError:
            raise ValueError(f"no process {pid}") from None
        except OSError as e:  # ENOSYS: Linux before 5.3
            raise ValueError(f"cannot hold process {pid} (pidfd_open: {e.strerror})") from None
        ident = parse_container_id(container_id) if container_id else None
        if ident and not _in_container("/proc", pid, ident):
            raise ValueError(f"process {pid} left container {ident[:12]} as the agent started")
        return held

    def path(self, name: str) -> str:
        """/proc/PID/NAME: what it names must be confirm()ed once opened."""
        return f"/proc/{self.pid}/{name}"

    def confirm(self) -> None:
        """Call after opening through path(): ProcessLookupError if the process had exited, when
        its PID, and so what was opened, may be another process's. (A zombie still holds its PID.)"""
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            raise ProcessLookupError(errno.ESRCH, GONE) from None
