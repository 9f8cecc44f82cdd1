"""`mirrord-ns attach` and `mirrord-ns sidecar`: the tunnel in a namespace that already exists.

`run` makes a namespace for its command; these plug one that is already in use (a
container's) into the tunnel, and give it back as it was:
- routes: two /1 routes through the TUN outrank the namespace's own default route
  and vanish with the TUN (netns/routes.py); only a pin for the agent's address,
  needed when our own SSH connection lives in that namespace, is undone by hand;
- addresses and links: the TUN and its /32 are ours alone and vanish with the TUN;
- the inbound mirror (unless --no-mirror): the pod's addresses on lo, a rule, a
  route and an nft table, removed when it stops or by the next attach
  (mirror/delivery.py `remove_routing`);
- DNS: the file the namespace's programs read as /etc/resolv.conf is opened once
  inside their root and rewritten in place through that descriptor, the original
  kept in root's own state (netns/resolvconf.py). Which file that is depends on the
  target; where no such file can be told or used safely, DNS is left alone with a warning.
`sidecar` repeats `attach` whenever the tunnel drops, for the namespace its container
shares with the services of a compose stack.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

from mirrord_tun import protocol
from mirrord_tun.connect import SetupError
from mirrord_tun.mirror.delivery import remove_routing
from mirrord_tun.netns import links, resolvconf, routes
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.command import LINK_LOST, process_exit
from mirrord_tun.run import LocalSession
from mirrord_tun.tunnel import TUN_NAME

log = logging.getLogger("mirrord-ns")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RETRY_MIN, RETRY_MAX = 1.0, 10.0  # sidecar: seconds between attempts, doubling
STABLE = 30.0  # sidecar: a session that lasted this long resets the back-off


@dataclass(frozen=True)
class Target:
    netns: str  # a file whose open fd names the namespace
    resolv: resolvconf.Place | None  # what its programs read as /etc/resolv.conf; None: leave DNS alone
    pid: int | None = None  # a process of the target: when it exits, so does attach
    label: str = ""


def say(msg: str) -> None:
    """attach's few messages: stderr, always (it has no command output to keep clean)."""
    print(f"mirrord-ns: {msg}", file=sys.stderr, flush=True)


def container_pid(name: str) -> int:
    """PID of a running container's init, from the Docker CLI (DOCKER_HOST is honoured)."""
    try:
        out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", name],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError(f"cannot ask Docker about container {name}: {e}") from None
    pid = out.stdout.strip()
    if out.returncode != 0 or not pid.isdigit() or pid == "0":
        raise SetupError(f"container {name}: not running ({out.stderr.strip() or 'no PID'})")
    return int(pid)


def _resolv_of_pid(pid: int) -> resolvconf.Place:
    # Resolved inside the process's root: its symlinks can never lead to this host's files.
    return resolvconf.Place(f"/proc/{pid}/root", "/etc/resolv.conf")


def _resolv_of_netns(path: str) -> resolvconf.Place | None:
    parent, name = os.path.split(os.path.abspath(path))
    if parent == "/run/netns":
        # What `ip netns exec NAME` bind-mounts over /etc/resolv.conf: root's own path.
        return resolvconf.Place("/", f"/etc/netns/{name}/resolv.conf", make_dir=True)
    say(f"{path} is not a named namespace: its programs keep their resolver "
        f"(use --pid or --container to give them the pod's)")
    return None


def resolve(netns: str | None, pid: int | None, container: str | None, dns: bool = True) -> Target:
    """Exactly one of netns, pid and container names the namespace."""
    if sum(x is not None for x in (netns, pid, container)) != 1:
        raise SetupError("give exactly one of --netns, --pid and --container")
    if container is not None:
        pid = container_pid(container)
    if pid is not None:
        if not os.path.exists(f"/proc/{pid}/ns/net"):
            raise SetupError(f"no process {pid}")
        label = f"container {container}" if container else f"process {pid}"
        return Target(f"/proc/{pid}/ns/net", _resolv_of_pid(pid) if dns else None, pid, label)
    assert netns is not None
    if not os.path.exists(netns):
        raise SetupError(f"no namespace {netns}")
    return Target(netns, _resolv_of_netns(netns) if dns else None, None, netns)


def _open(target: Target) -> NetNs:
    ns = NetNs.open(target.netns)
    if ns.call(links.has_link, TUN_NAME):
        ns.close()
        raise SetupError(f"{target.label} already has {TUN_NAME}: is another attach running there?")
    return ns


def _steer(session: LocalSession) -> Callable[[str], Callable[[], None]]:
    def steer(tun: str) -> Callable[[], None]:  # runs inside the target namespace
        routes.remove_leftovers()
        remove_routing()  # a killed mirroring attach's pod addresses, rule, route and nft table
        # Our SSH connection lives in our main thread's namespace; in the target's
        # (a sidecar), its packets must not be routed into the tunnel they carry,
        # nor end on `lo` because the mirror made a pod address of the agent's local.
        same = os.stat("/proc/thread-self/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
        keep = [session.agent_ip] if same and session.agent_ip else []
        session.mirror_exclude.update(keep)
        return routes.steer_into(tun, keep)
    return steer


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _give_resolver(target: Target, pod_conf: str) -> resolvconf.Held | None:
    """The target's resolver file, now saying `pod_conf`; None (with a warning) where it is left alone."""
    if target.resolv is None or not pod_conf.strip():
        return None
    def refused(e: OSError) -> None:
        why = str(e) if e.strerror is None else f"{target.resolv.path}: {e.strerror}"  # ours say the path
        say(f"{target.label}: {why}; leaving its resolver alone")

    try:
        held = resolvconf.Held.open(target.resolv)
    except OSError as e:
        refused(e)
        return None
    try:
        if target.pid is not None and held.same_file("/etc/resolv.conf"):
            # rewriting it would change this host's resolver
            say(f"process {target.pid} reads this host's /etc/resolv.conf; leaving it alone")
        else:
            held.install(pod_conf)
            return held
    except OSError as e:
        refused(e)
    held.close()
    return None


def _hold(session: LocalSession, target: Target) -> Callable[[NetNs, protocol.Welcome], Awaitable[int]]:
    async def use(ns: NetNs, welcome: protocol.Welcome) -> int:
        conf = _give_resolver(target, welcome.resolv_conf)
        exited = asyncio.ensure_future(process_exit(target.pid)) if target.pid is not None else None
        try:
            say(f"{target.label} is in the pod's network (tunnel address {welcome.client_addr}, "
                f"pod {','.join(welcome.pod_addrs) or '?'}{', pod resolver' if conf else ''}); "
                f"Ctrl-C or SIGTERM to detach")
            # Resumes the session after a dropped connection, for as long as the agent keeps it.
            lost = await session.until_lost(*([exited] if exited else []))
            if lost is not None:
                say(lost)
                return LINK_LOST
            say(f"{target.label} exited")
            return 1
        finally:
            if exited:
                exited.cancel()
            if conf:
                try:
                    conf.restore()
                finally:
                    conf.close()
    return use


async def attach(session: LocalSession, target: Target) -> int:
    """Plug `target` into the session's tunnel until the tunnel or the target ends
    (or the task is cancelled: see `until_signalled`), then restore it."""
    return await session.serve(lambda: _open(target), _steer(session), _hold(session, target))


async def until_signalled(work: Awaitable[int]) -> int:
    """Run `work` until it ends or a stop signal comes; cancelling it runs its cleanup. 0 on a signal."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _settle, stop)
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return 0
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def sidecar(new_session: Callable[[], LocalSession], target: Target) -> int:
    """attach, and attach again each time the tunnel drops, until a stop signal."""
    async def forever() -> int:
        delay = RETRY_MIN
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await attach(new_session(), target)
            except SetupError as e:
                say(str(e))
            except Exception as e:  # noqa: BLE001 - a sidecar keeps trying, whatever failed
                log.debug("attach failed", exc_info=True)
                say(f"attach failed: {e!r}")
            if asyncio.get_running_loop().time() - started > STABLE:
                delay = RETRY_MIN
            say(f"attaching again in {delay:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
    return await until_signalled(forever())


def hold() -> int:
    """`sidecar --hold`: keep a namespace alive (as a pause container does) until a stop signal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    signal.sigwait(STOP_SIGNALS)
    return 0


def own_namespace(dns: bool = True) -> Target:
    """The sidecar's target: the namespace (and resolv.conf) its container shares with the stack."""
    return Target("/proc/self/ns/net", resolvconf.Place("/", "/etc/resolv.conf") if dns else None, None,
                  "this namespace")
