"""TUN devices with the virtio-net header and kernel offloads.

With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6) the kernel hands over and
accepts 64 KiB TCP super-packets with partial checksums, so a Python pump moves
one packet where it would otherwise move forty. Every packet read or written is
`VNET_HDR_LEN` bytes of virtio header followed by the IP packet; the header is
carried unchanged between two such TUNs.
"""
from __future__ import annotations

import fcntl
import os

import pytun

VNET_HDR_LEN = 10
MAX_PACKET = 65535 + VNET_HDR_LEN
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
# A plain (non-GSO) virtio header: no checksum work, no segmentation.
PLAIN_VNET_HDR = bytes(VNET_HDR_LEN)


class Tun:
    """An open TUN device; the device disappears when the fd is closed (or, left to its
    namespace with `close(with_namespace=True)`, when the namespace goes)."""

    def __init__(self, name: str) -> None:
        self._dev = pytun.TunTapDevice(
            name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
        )
        self.name: str = self._dev.name
        self.fd: int = self._dev.fileno()
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        os.set_blocking(self.fd, False)

    def close(self, with_namespace: bool = False) -> None:
        """`with_namespace`: leave the device to its namespace, which removes it when it goes, in
        the kernel's background work; for a namespace that goes with this process. Closing the
        last fd of a TUN unregisters it there and then, waiting 10-20 ms for RCU grace periods."""
        if self.fd >= 0:
            if with_namespace:
                self._dev.persist(True)
            self._dev.close()
            self.fd = -1
