"""`mirrord-ns demo`: see the tunnel work with no cluster at all.

Builds the sandbox cluster (mirrord_tun.sandbox) on this machine, runs a command
through `mirrord-ns run` from a "laptop" namespace that cannot reach the cluster
by itself, and tears everything down, also on Ctrl-C.
"""
from __future__ import annotations

import subprocess
import sys

from mirrord_tun.sandbox import ADDRS, Sandbox

TOUR = r"""
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "curl http://svc/   (the service sees the pod's address, not ours)"
curl -sS -m 5 http://svc/ || exit 1
say "getent hosts svc   (the pod's resolver and search domains)"
getent hosts svc || exit 1
say "ping svc"
busybox ping -c 3 -W 2 svc || exit 1
"""


def demo(command: list[str]) -> int:
    out = sys.stderr
    print(f"mirrord-ns demo: building a sandbox cluster from namespaces: pod {ADDRS['pod']}, "
          f"svc {ADDRS['svc']}, dns {ADDRS['dns']}", file=out)
    with Sandbox() as sb:
        sb.start_services()
        sb.start_agent()
        direct = sb.exec("laptop", "curl", "-sS", "-m", "2", f"http://{ADDRS['svc']}/")
        print(f"mirrord-ns demo: from the laptop namespace without mirrord-ns: "
              f"{(direct.stderr or direct.stdout).strip()}", file=out)
        argv = command or ["sh", "-c", TOUR]
        print(f"mirrord-ns demo: now through the tunnel: {' '.join(argv) if command else 'a short tour'}",
              file=out, flush=True)
        proc = subprocess.Popen(sb.run_args(*argv))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to `run` as well; let it finish and clean up.
            code = proc.wait()
        print(f"\nmirrord-ns demo: exit status {code}; removing the sandbox", file=out)
    return code
