"""A PACKET_MMAP TPACKET_V3 receive ring: the capture's copies without a system call per packet.

The kernel writes each packet that passed the socket's filter into the next
block of a ring shared with us (mmap), and hands a block over (block_status
TP_STATUS_USER) when it is full or RETIRE_MS after its first packet; poll says
readable then. We read every packet of the handed-over blocks straight from the
shared memory and give each block back (TP_STATUS_KERNEL). A `recvfrom` per
packet cost a system call and a wake-up each; here one wake-up takes a block
of them. While we do not give blocks back (the channel is paused), the kernel
drops further packets and counts them (PACKET_STATISTICS), as a full receive
buffer did before: bounded at BLOCKS * BLOCK_SIZE per socket.

The ring holds BLOCKS blocks whatever their fill, and a block is handed over
RETIRE_MS after its first packet even if nearly empty: while the agent is
paused, a short RETIRE_MS fills the ring with nearly empty blocks (with 2 ms,
on a busy machine, the 200 POSTs of tests/test_mirror.py lost 838 of 9249
copies; under wrk's small requests, 15 % with 1 MiB blocks and 8 ms, 3-22 %
with 512 KiB and 10 ms, none with 40 ms). Small blocks and 40 ms let them
fill; under light load a copy waits up to that long, which only the mirror's
local copy feels, never the pod.

Layouts (linux/if_packet.h): tpacket_block_desc {version, offset_to_priv,
tpacket_hdr_v1 {block_status, num_pkts, offset_to_first_pkt, ...}};
tpacket3_hdr {tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status,
tp_mac, tp_net, ...} (48 bytes), followed by the sockaddr_ll.
"""
from __future__ import annotations

import fcntl
import mmap
import socket
import struct

SOL_PACKET, PACKET_RX_RING, PACKET_VERSION, TPACKET_V3 = 263, 5, 10, 2
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
BLOCK_SIZE = 1 << 19  # holds the largest copy (bpf.SNAPLEN, a GRO packet)
# 128 MiB per socket, what waits while the channel is paused: as much as the receive buffer it
# replaces (64 MiB asked, which the kernel doubles), but allocated while the capture lives.
BLOCKS = 256
FRAME_SIZE = 2048  # only a sanity figure for V3, whose frames are variable
RETIRE_MS = 40  # a block with packets is handed over after this long at most (see below)
SIOCGIFNAME = 0x8910
_BLOCK = struct.Struct("=8xIII")  # block_status, num_pkts, offset_to_first_pkt
_PACKET = struct.Struct("=I8xI8xH")  # tp_next_offset, tp_snaplen, tp_mac
_IFINDEX = struct.Struct("=i")
_SLL_IFINDEX = 48 + 4  # sockaddr_ll.sll_ifindex, after the TPACKET_ALIGNed tpacket3_hdr


class Ring:
    """The receive ring of `sock` (an AF_PACKET socket); `read` takes what the kernel handed over."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
            "=7I", BLOCK_SIZE, BLOCKS, FRAME_SIZE, BLOCK_SIZE * BLOCKS // FRAME_SIZE, RETIRE_MS, 0, 0))
        self._sock = sock
        self._map = mmap.mmap(sock.fileno(), BLOCK_SIZE * BLOCKS, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._next = 0  # the block the kernel hands over next
        self._names: dict[int, str] = {}

    def read(self, budget: int) -> list[tuple[int, bytes]]:
        """(ifindex, packet) of every packet in the blocks handed over, block by block until about
        `budget` bytes were taken; those blocks go back to the kernel."""
        m, out, taken = self._map, [], 0
        while taken < budget:
            base = self._next * BLOCK_SIZE
            status, count, off = _BLOCK.unpack_from(m, base)
            if not status & TP_STATUS_USER:
                break
            off += base
            for _ in range(count):
                step, snaplen, mac = _PACKET.unpack_from(m, off)
                out.append((_IFINDEX.unpack_from(m, off + _SLL_IFINDEX)[0], m[off + mac : off + mac + snaplen]))
                taken += snaplen
                off += step
            _IFINDEX.pack_into(m, base + 8, TP_STATUS_KERNEL)
            self._next = (self._next + 1) % BLOCKS
        return out

    def ifname(self, ifindex: int) -> str:
        """The device's name in the socket's own namespace (cached: ifindexes are not reused soon)."""
        name = self._names.get(ifindex)
        if name is None:
            req = fcntl.ioctl(self._sock.fileno(), SIOCGIFNAME, struct.pack("16si20x", b"", ifindex))
            name = self._names[ifindex] = req[:16].split(b"\0", 1)[0].decode()
        return name

    def close(self) -> None:
        self._map.close()
