"""Classic BPF for the mirror capture, built from the subscription and attached in the kernel.

The socket is AF_PACKET/SOCK_DGRAM, so offset 0 is the IPv4 header. The program
accepts a packet only if every test holds, so nothing else ever reaches Python:

1. it came in (pkttype is not PACKET_OUTGOING: the pod's own sends are not copies);
2. it did not arrive through one of our TUNs (those carry the tunnel's own traffic);
3. IPv4, not a fragment (only whole packets carry ports), destination a pod address;
4. TCP or UDP with a destination port in the subscribed set;
5. for TCP, it carries payload or SYN/FIN/RST: the client's pure ACKs tell the
   local side nothing, and are often half of its packets.

Every list test is `jeq k, 0, 1; ja target`: `ja` takes a 32-bit offset, so
lists of any length fit, where a plain `jeq` could jump at most 255 instructions.
"""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

from mirrord_tun import protocol

SO_ATTACH_FILTER = 26
MAX_PORTS = protocol.MAX_PORTS  # 2 instructions each; the kernel allows 4096
SNAPLEN = 0x40000  # a GRO-coalesced packet is at most 64 KiB; take it whole

# opcodes (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_B_IND = 0x48, 0x50
_LDX_B_MSH = 0xB1
_LD_MEM, _ST = 0x60, 0x02
_ALU_AND_K, _ALU_RSH_K, _ALU_SUB_X = 0x54, 0x74, 0x1C
_TAX = 0x07
_JEQ_K, _JGT_K, _JSET_K, _JA = 0x15, 0x25, 0x45, 0x05
_RET_K = 0x06
_TCP_FIN_SYN_RST = 0x07
# ancillary loads (SKF_AD_OFF + n)
_AD_PKTTYPE, _AD_IFINDEX = -0x1000 + 4, -0x1000 + 8
PACKET_OUTGOING = 4

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> Insn:
    return (code, jt, jf, k & 0xFFFFFFFF)


def program(pod_addrs: list[str], ports: set[int], skip_ifindexes: set[int]) -> list[Insn]:
    """The filter for `ports` on `pod_addrs`; an empty port set rejects everything."""
    if not ports or not pod_addrs:
        return [_ins(_RET_K, 0)]
    if len(ports) > MAX_PORTS:
        raise ValueError(f"at most {MAX_PORTS} mirrored ports")
    # Instructions are emitted with symbolic targets ("accept"/"reject"/"l4"),
    # resolved once the layout is known.
    code: list[tuple[int, int, int, int, str]] = []

    def emit(op: int, k: int = 0, jt: int = 0, jf: int = 0, target: str = "") -> None:
        code.append((op, jt, jf, k, target))

    def any_of(values: list[int], target: str) -> None:
        for v in values:
            emit(_JEQ_K, v, 0, 1)
            emit(_JA, target=target)

    emit(_LD_W_ABS, _AD_PKTTYPE)
    emit(_JEQ_K, PACKET_OUTGOING, 0, 1)
    emit(_JA, target="reject")
    if skip_ifindexes:
        emit(_LD_W_ABS, _AD_IFINDEX)
        any_of(sorted(skip_ifindexes), "reject")
    emit(_LD_B_ABS, 0)
    emit(_ALU_AND_K, 0xF0)
    emit(_JEQ_K, 0x40, 1, 0)
    emit(_JA, target="reject")
    emit(_LD_H_ABS, 6)
    emit(_JSET_K, 0x3FFF, 0, 1)  # MF flag or a fragment offset
    emit(_JA, target="reject")
    emit(_LD_W_ABS, 16)
    any_of([int(ipaddress.IPv4Address(a)) for a in pod_addrs], "l4")
    emit(_JA, target="reject")
    labels = {"l4": len(code)}
    emit(_LD_B_ABS, 9)
    emit(_JEQ_K, socket.IPPROTO_TCP, 2, 0)
    emit(_JEQ_K, socket.IPPROTO_UDP, 1, 0)
    emit(_JA, target="reject")
    emit(_LDX_B_MSH, 0)  # X = IP header length
    emit(_LD_H_IND, 2)  # destination port, same offset for TCP and UDP
    any_of(sorted(ports), "useful")
    emit(_JA, target="reject")
    labels["useful"] = len(code)
    emit(_LD_B_ABS, 9)
    emit(_JEQ_K, socket.IPPROTO_UDP, 0, 1)
    emit(_JA, target="accept")
    emit(_LD_B_IND, 13)  # TCP flags (X still holds the IP header length)
    emit(_JSET_K, _TCP_FIN_SYN_RST, 0, 1)
    emit(_JA, target="accept")
    emit(_LD_H_ABS, 2)  # payload = IP total length - IP header - TCP header
    emit(_ALU_SUB_X)
    emit(_ST, 0)
    emit(_LD_B_IND, 12)
    emit(_ALU_AND_K, 0xF0)
    emit(_ALU_RSH_K, 2)
    emit(_TAX)
    emit(_LD_MEM, 0)
    emit(_ALU_SUB_X)
    emit(_JGT_K, 0, 0, 1)
    emit(_JA, target="accept")
    labels["reject"] = len(code)
    emit(_RET_K, 0)
    labels["accept"] = len(code)
    emit(_RET_K, SNAPLEN)
    out: list[Insn] = []
    for i, (op, jt, jf, k, target) in enumerate(code):
        if target:
            k = labels[target] - i - 1
        out.append(_ins(op, k, jt, jf))
    return out


def attach(sock: socket.socket, insns: list[Insn]) -> None:
    """Attach (or atomically replace) the socket's filter; the kernel copies the program."""
    blob = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(blob, len(blob))
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
