"""The capture filter leaves out a TUN made after it was built, in the kernel (root).

The agent reads copies without their address (no device name to check in Python),
so the filter must already reject what a session's TUN, made later in the pod's
namespace, carries, while still passing what older devices (here lo) bring in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")

POD = "198.18.0.10"
PORT = 8080

# Runs inside the test's namespace: filter first, then the TUN, then one datagram each way.
_CHILD = f"""
import json, os, socket, struct, time
import pytun
from mirrord_tun.agent import bpf
cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
cap.setblocking(False)
newest = max(i for i, _ in socket.if_nameindex())
bpf.attach(cap, bpf.program(["{POD}"], {{{PORT}}}, set(), newest))
tun = pytun.TunTapDevice(name="mrdtest0", flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
tun.up()
udp = struct.pack("!HHHH", 5000, {PORT}, 9, 0) + b"t"
tun.write(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 0, 0x4000, 64, 17, 0,
                      socket.inet_aton("198.18.0.30"), socket.inet_aton("{POD}")) + udp)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"l", ("{POD}", {PORT}))
time.sleep(0.2)
got = []
try:
    while True:
        got.append(cap.recv(2048)[-1:].decode())
except BlockingIOError:
    pass
print(json.dumps(got))
"""


def test_a_tun_made_after_the_filter_is_not_captured_older_devices_are() -> None:
    ns = f"mrdt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{POD}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _CHILD], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        # The datagram through lo, once (its outgoing pass is not a copy); the TUN's never.
        assert json.loads(out.stdout) == ["l"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
