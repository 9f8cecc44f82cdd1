"""Classic BPF for the mirror capture, built from the subscription and attached in the kernel.

The sockets are AF_PACKET/SOCK_DGRAM (one for IPv4, one for IPv6: agent/sniffer.py),
so offset 0 is the IP header; the same program serves both. It accepts a packet
only if every test holds, so nothing else ever reaches Python:

1. it came in (pkttype is not PACKET_OUTGOING: the pod's own sends are not copies);
2. it did not arrive through one of our TUNs (those carry the tunnel's own traffic);
3. IPv4, not a fragment (only whole packets carry ports), destination a pod address;
   or IPv6 to a pod address, its next header TCP or UDP;
4. TCP or UDP with a destination port in the subscribed set;
5. for TCP, it carries payload or SYN/FIN/RST: the client's pure ACKs tell the
   local side nothing, and are often half of its packets.

An IPv6 packet to a pod address with an extension header first (hop-by-hop,
routing, fragment, destination options) has its ports somewhere cBPF cannot
follow (a chain of variable-length headers). Such packets are rare; rather than
drop them unseen, the program passes their first EXT_SNAPLEN bytes, enough for
the agent to count them (`mirror_skipped_ipv6_ext`) and drop them.

The family sections leave the L3 header length in X, the IP payload length in
M[0] and the L4 protocol in M[1], so one port list serves both: a port list
per family would not fit MAX_PORTS in the kernel's 4096 instructions.

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
EXT_SNAPLEN = 40  # an IPv6 header with an extension header next: enough to count it
# IPv6 extension headers that may come before TCP or UDP: hop-by-hop, routing, fragment,
# destination options
IPV6_EXTENSIONS = frozenset({0, 43, 44, 60})

# opcodes (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_B_IND = 0x48, 0x50
_LDX_B_MSH, _LDX_IMM = 0xB1, 0x01
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
    """The filter for `ports` on `pod_addrs` (IPv4 and IPv6); an empty port set rejects everything."""
    if not ports or not pod_addrs:
        return [_ins(_RET_K, 0)]
    if len(ports) > MAX_PORTS:
        raise ValueError(f"at most {MAX_PORTS} mirrored ports")
    addrs = [ipaddress.ip_address(a) for a in pod_addrs]
    v4 = [int(a) for a in addrs if a.version == 4]
    v6 = [a.packed for a in addrs if a.version == 6]
    # Instructions are emitted with symbolic targets ("accept"/"reject"/"l4"...),
    # resolved once the layout is known.
    code: list[tuple[int, int, int, int, str]] = []
    labels: dict[str, int] = {}

    def emit(op: int, k: int = 0, jt: int = 0, jf: int = 0, target: str = "") -> None:
        code.append((op, jt, jf, k, target))

    def label(name: str) -> None:
        labels[name] = len(code)

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
    any_of([0x40] if v4 else [], "ipv4")
    any_of([0x60] if v6 else [], "ipv6")
    emit(_JA, target="reject")
    if v4:
        label("ipv4")
        emit(_LD_H_ABS, 6)
        emit(_JSET_K, 0x3FFF, 0, 1)  # MF flag or a fragment offset
        emit(_JA, target="reject")
        emit(_LD_W_ABS, 16)
        any_of(v4, "l4v4")
        emit(_JA, target="reject")
        label("l4v4")
        emit(_LD_B_ABS, 9)
        emit(_JEQ_K, socket.IPPROTO_TCP, 1, 0)
        emit(_JEQ_K, socket.IPPROTO_UDP, 0, 1)
        emit(_JA, target="v4ok")
        emit(_JA, target="reject")
        label("v4ok")
        emit(_ST, 1)
        emit(_LDX_B_MSH, 0)  # X = IP header length
        emit(_LD_H_ABS, 2)  # IP payload = total length - header
        emit(_ALU_SUB_X)
        emit(_ST, 0)
        emit(_JA, target="ports")
    if v6:
        label("ipv6")
        for packed in v6:  # 4 word compares; a mismatch skips to the next address
            words = struct.unpack("!4I", packed)
            for i, w in enumerate(words):
                emit(_LD_W_ABS, 24 + 4 * i)
                emit(_JEQ_K, w, 0, 7 - 2 * i)
            emit(_JA, target="l4v6")
        emit(_JA, target="reject")
        label("l4v6")
        emit(_LD_B_ABS, 6)  # next header
        emit(_JEQ_K, socket.IPPROTO_TCP, 1, 0)
        emit(_JEQ_K, socket.IPPROTO_UDP, 0, 1)
        emit(_JA, target="v6ok")
        any_of(sorted(IPV6_EXTENSIONS), "extension")
        emit(_JA, target="reject")
        label("v6ok")
        emit(_ST, 1)
        emit(_LD_H_ABS, 4)  # payload length: everything past the fixed header
        emit(_ST, 0)
        emit(_LDX_IMM, 40)
    label("ports")
    emit(_LD_H_IND, 2)  # destination port, same offset for TCP and UDP
    any_of(sorted(ports), "useful")
    emit(_JA, target="reject")
    label("useful")
    emit(_LD_MEM, 1)
    emit(_JEQ_K, socket.IPPROTO_UDP, 0, 1)
    emit(_JA, target="accept")
    emit(_LD_B_IND, 13)  # TCP flags
    emit(_JSET_K, _TCP_FIN_SYN_RST, 0, 1)
    emit(_JA, target="accept")
    emit(_LD_B_IND, 12)  # payload = IP payload - TCP header
    emit(_ALU_AND_K, 0xF0)
    emit(_ALU_RSH_K, 2)
    emit(_TAX)
    emit(_LD_MEM, 0)
    emit(_ALU_SUB_X)
    emit(_JGT_K, 0, 0, 1)
    emit(_JA, target="accept")
    label("reject")
    emit(_RET_K, 0)
    label("accept")
    emit(_RET_K, SNAPLEN)
    if v6:
        label("extension")
        emit(_RET_K, EXT_SNAPLEN)
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
