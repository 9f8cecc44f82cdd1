"""`run`'s command: started in the session's namespace as the invoking user, waited for, reaped.

Signals that `run` receives go on to the command (keyboard ones only when it does not have
the terminal already); the pod's resolv.conf reaches it through a bind mount of a file that
is unlinked as soon as it is mounted; whatever the command leaves running in the namespace
is stopped when it exits. If the tunnel is lost for good meanwhile, the command is stopped
too and `run` exits with LINK_LOST.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import logging
import os
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Awaitable, Callable

from mirrord_tun import protocol, timing
from mirrord_tun.connect import SetupError
from mirrord_tun.interrupts import terminal_foreground
from mirrord_tun.netns import exec as nsexec
from mirrord_tun.netns.namespace import NetNs, pids_in

if TYPE_CHECKING:
    from mirrord_tun.mounts import Mounts  # only with --mount, which imports it

log = logging.getLogger("mirrord-ns")
KILL_GRACE = 3.0
LINK_LOST = 2  # exit status when the tunnel dies under the command
# Waits until one of the futures is done (None) or the tunnel is lost for good (why): reconnect.keep_up.
KeepUp = Callable[..., Awaitable["str | None"]]


@dataclasses.dataclass
class Command:
    argv: list[str]
    env: dict[str, str]  # on top of ours: the target container's environment
    mounts: Mounts | None
    keep_up: KeepUp

    async def run_in(self, ns: NetNs, welcome: protocol.Welcome) -> int:
        """Run the command in `ns` with the pod's resolver until it exits or the tunnel is lost for
        good; its exit status (LINK_LOST for the latter), once everything it left there is stopped."""
        resolv = _write_resolv_conf(welcome.resolv_conf)
        try:
            return await self._run_command(ns, resolv)
        finally:
            timing.mark("command exited")
            if self.mounts:
                self.mounts.ending()  # the reaping below stops sshfs too
            await _reap_namespace(ns)
            timing.mark("namespace reaped")
            if resolv:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(resolv)

    async def _run_command(self, ns: NetNs, resolv: str | None) -> int:
        # Handlers go in before the command exists: a signal that lands while spawn() runs (the
        # command may already have the terminal) then waits in the loop and is forwarded, instead
        # of meeting asyncio's SIGINT handler (cancel, exit 130) or killing `run` unclean (SIGTERM).
        loop = asyncio.get_running_loop()
        pid: list[int] = []  # the command's, once spawned
        _forward_signals(loop, pid)
        try:
            return await self._spawn_and_wait(ns, resolv, pid)
        finally:
            for sig in _SIGNALS:  # held, not reset: a signal must not cut the cleanup short
                loop.add_signal_handler(sig, lambda: None)

    async def _spawn_and_wait(self, ns: NetNs, resolv: str | None, pid: list[int]) -> int:
        try:
            proc = nsexec.spawn(self.argv, ns.fd, resolv, nsexec.invoking_user(), self.env,
                                mounts=self.mounts)
        except FileNotFoundError:
            print(f"mirrord-ns: {self.argv[0]}: command not found", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"mirrord-ns: {self.argv[0]}: permission denied", file=sys.stderr)
            return 126
        except OSError as e:  # ENOEXEC, ENOTDIR, ELOOP...: a shell also says 126, in one line
            print(f"mirrord-ns: {self.argv[0]}: cannot execute: {e.strerror}", file=sys.stderr)
            return 126
        except subprocess.SubprocessError as e:  # the namespace, mount or user switch failed
            raise SetupError(f"cannot start {self.argv[0]} in the namespace: {e}") from None
        if resolv:
            # The bind mount holds the file now; unlinked, it cannot outlive a killed `run`.
            os.unlink(resolv)
        timing.mark("command started")
        exited = asyncio.ensure_future(process_exit(proc.pid))
        pid.append(proc.pid)
        try:
            lost = await self.keep_up(exited)
            if lost is not None:
                print(f"mirrord-ns: {lost}; stopping the command", file=sys.stderr)
                proc.terminate()
                try:
                    await asyncio.wait_for(exited, KILL_GRACE)
                except asyncio.TimeoutError:
                    proc.kill()
                proc.wait()
                return LINK_LOST
            rc = proc.wait()
            return 128 - rc if rc < 0 else rc
        finally:
            exited.cancel()


async def process_exit(pid: int) -> None:
    """Return when process `pid` exits (its pidfd turns readable), without reaping it."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


def _forward_signals(loop: asyncio.AbstractEventLoop, pid: list[int]) -> None:
    """Pass signals on to the command, except keyboard ones it already got from the terminal."""
    def forward(sig: signal.Signals) -> None:
        if sig in (signal.SIGINT, signal.SIGQUIT) and terminal_foreground():
            return
        for p in pid:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, forward, sig)


RESOLV_DIR = "/run"
RESOLV_PREFIX = "mirrord-ns-resolv."


def _write_resolv_conf(text: str) -> str | None:
    """The pod's resolv.conf in a file for the command's bind mount (unlinked once it is mounted).

    Its name carries our PID, so one a SIGKILL left behind is recognisably stale.
    """
    if not text.strip():
        log.warning("the agent sent no resolver configuration; keeping this host's /etc/resolv.conf")
        return None
    remove_stale_resolv_files()
    fd, path = tempfile.mkstemp(prefix=f"{RESOLV_PREFIX}{os.getpid()}.",
                                dir=RESOLV_DIR if os.access(RESOLV_DIR, os.W_OK) else None)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def remove_stale_resolv_files() -> list[str]:
    """Files of `run`s that died between writing and mounting them."""
    removed = []
    for path in glob.glob(os.path.join(RESOLV_DIR, RESOLV_PREFIX + "*")):
        pid = os.path.basename(path)[len(RESOLV_PREFIX):].partition(".")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


async def _reap_namespace(ns: NetNs) -> None:
    """Stop whatever the command left running in the namespace (daemons, stray children)."""
    loop = asyncio.get_running_loop()

    def left() -> list[int]:
        return [p for p in pids_in(ns.ident) if p != os.getpid()]

    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 2.0)):
        pids = left()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = loop.time() + wait
        while loop.time() < deadline:
            await asyncio.sleep(0.02)
            if not left():
                return
