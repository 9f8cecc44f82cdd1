"""`mirrord-ns demo`: see the tunnel work with no cluster at all.

Builds the sandbox cluster (mirrord_tun.sandbox) on this machine, runs a command
through `mirrord-ns run` from a "laptop" namespace that cannot reach the cluster
by itself, and tears everything down, also on Ctrl-C, SIGTERM and SIGHUP (the
terminal closed): the sandbox holds namespaces and private keys.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from types import FrameType

from mirrord_tun.sandbox import ADDRS, Sandbox

TOUR = r"""
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "curl http://svc/   (the service sees the pod's address, not ours)"
curl -sS -m 5 http://svc/ || exit 1
say "getent hosts svc   (the pod's resolver and search domains)"
getent hosts svc || exit 1
say "ping svc"
# iputils' ping works as a user (ICMP echo sockets); Debian 12's busybox ping needs root.
PING=$(command -v ping || echo busybox ping)
$PING -c 3 -W 2 svc || exit 1
"""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def demo(command: list[str]) -> int:
    run: list[subprocess.Popen[bytes]] = []  # `mirrord-ns run`, once started

    def stop(sig: int, _frame: FrameType | None) -> None:
        if run:
            # `run` stops its command and cleans up; we remove the sandbox once it has.
            with contextlib.suppress(ProcessLookupError):
                run[0].send_signal(sig)
        else:
            _hold_signals()
            raise KeyboardInterrupt  # unwinds through Sandbox's cleanup, like Ctrl-C

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        return _tour(command, run)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tour(command: list[str], run: list[subprocess.Popen[bytes]]) -> int:
    _say(f"building a sandbox cluster from namespaces: pod {ADDRS['pod']}, svc {ADDRS['svc']}, "
         f"dns {ADDRS['dns']}")
    with Sandbox() as sb:
        sb.start_services()
        sb.start_agent()
        direct = sb.exec("laptop", "curl", "-sS", "-m", "2", f"http://{ADDRS['svc']}/")
        _say(f"from the laptop namespace without mirrord-ns: {(direct.stderr or direct.stdout).strip()}")
        argv = command or ["sh", "-c", TOUR]
        _say(f"now through the tunnel: {' '.join(argv) if command else 'a short tour'}")
        run.append(subprocess.Popen(sb.run_args(*argv)))
        sb.procs.append(run[0])  # whatever happens next, close() stops it first
        try:
            code = run[0].wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to `run` as well; let it finish and clean up.
            code = run[0].wait()
        _hold_signals()
        _say(f"exit status {code}; removing the sandbox", before="\n")
    return code


def _hold_signals() -> None:
    """From here on no signal may cut the sandbox's removal short."""
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


def _say(text: str, before: str = "") -> None:
    # After a hangup the terminal is gone (EIO): the sandbox must still be removed.
    with contextlib.suppress(OSError):
        print(f"{before}mirrord-ns demo: {text}", file=sys.stderr, flush=True)
