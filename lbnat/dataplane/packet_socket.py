"""The AF_PACKET socket lbnat reads and writes frames with, and its classic BPF filter.

Why PACKET_VNET_HDR: on veth (and most NICs with offloads) the kernel hands over TSO/GSO
"super-packets" of up to 64 KB whose transport checksum is only partial. With this option every
frame read is preceded by a struct virtio_net_hdr that says so (GSO type and size, NEEDS_CSUM
with csum_start/csum_offset), and a frame written with the same header is segmented and
checksummed by the kernel on the way out. lbnat rewrites headers in place and sends the frame
back with the header it came with, so a 64 KB segment costs one trip through Python.

Why ETH_P_IP and not ETH_P_ALL: a protocol-specific packet socket is not fed the host's own
outgoing frames (only ETH_P_ALL taps see those), so lbnat never reads back what it sent, and it
is fed before ip_rcv's prerouting hook, where the kernel guard drops lbnat's packets
(lbnat.dataplane.guard).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbnat.dataplane.rings import RingSpec

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
ETH_P_IP = 0x0800

VNET_HDR_LEN = 10  # struct virtio_net_hdr, no mergeable-buffers field
VNET_F_NEEDS_CSUM = 1
ETH_HDR_LEN = 14
IP_OFFSET = VNET_HDR_LEN + ETH_HDR_LEN  # where the IPv4 header starts in a frame we read
NO_VNET_HDR = bytes(VNET_HDR_LEN)  # for frames lbnat builds itself: no GSO, checksums complete
RECV_BUFFER = 1 << 17  # a 64 KB GSO super-packet plus headers fits with room to spare

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_LD_H_IND = 0x48
_LD_B_IND = 0x50
_LDX_B_MSH = 0xB1
_JA = 0x05
_JEQ = 0x15
_JGT = 0x25
_JGE = 0x35
_JSET = 0x45
_RET_K = 0x06

Insn = tuple[int, str | int, str | int, int]  # (code, true target, false target, k)


def assemble(program: Sequence[tuple[str | None, Insn]]) -> bytes:
    """Resolve symbolic jump targets ("next" or a label) into BPF's relative offsets."""
    labels = {label: index for index, (label, _) in enumerate(program) if label}
    out = bytearray()
    for index, (_, (code, true, false, k)) in enumerate(program):

        def offset(target: str | int, here: int = index) -> int:
            if isinstance(target, int):
                return target
            if target == "next":
                return 0
            distance = labels[target] - here - 1
            if not 0 <= distance < 256:
                raise ValueError(f"BPF jump to {target} out of range ({distance})")
            return distance

        if code == _JA:
            out += struct.pack("=HBBI", code, 0, 0, offset(true))
        else:
            out += struct.pack("=HBBI", code, offset(true), offset(false), k)
    return bytes(out)


def build_filter(
    lb_ip: int,
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    nat_ports: tuple[int, int],
) -> bytes:
    """Accept IPv4 TCP/UDP to lb_ip whose destination port is a service port of its protocol
    or in the NAT range (either protocol); ICMP errors to lb_ip (they may be about a
    translated flow); IP fragments of TCP/UDP to lb_ip, so they are counted as drops.
    Everything else is left to the kernel and never copied to Python."""
    first, last = nat_ports
    p: list[tuple[str | None, Insn]] = [
        (None, (_LD_H_ABS, 0, 0, 12)),  # ethertype
        (None, (_JEQ, "next", "reject", ETH_P_IP)),
        (None, (_LD_W_ABS, 0, 0, ETH_HDR_LEN + 16)),  # destination address
        (None, (_JEQ, "next", "reject", lb_ip)),
        (None, (_LD_H_ABS, 0, 0, ETH_HDR_LEN + 6)),  # flags + fragment offset
        (None, (_JSET, "fragment", "next", 0x3FFF)),
        (None, (_LD_B_ABS, 0, 0, ETH_HDR_LEN + 9)),  # protocol
        (None, (_JEQ, "tcp", "next", 6)),
        (None, (_JEQ, "udp", "next", 17)),
        (None, (_JEQ, "icmp", "reject", 1)),
        # ICMP destination-unreachable and time-exceeded: maybe about a translated flow.
        ("icmp", (_LDX_B_MSH, 0, 0, ETH_HDR_LEN)),
        (None, (_LD_B_IND, 0, 0, ETH_HDR_LEN)),  # ICMP type
        (None, (_JEQ, "accept", "next", 3)),
        (None, (_JEQ, "accept", "reject", 11)),
    ]
    for label, ports in (("tcp", sorted(set(tcp_ports))), ("udp", sorted(set(udp_ports)))):
        p.append((label, (_LDX_B_MSH, 0, 0, ETH_HDR_LEN)))  # X = IP header length
        p.append((None, (_LD_H_IND, 0, 0, ETH_HDR_LEN + 2)))  # destination port
        p.extend((None, (_JEQ, "accept", "next", port)) for port in ports)
        p.append((None, (_JA, "nat_range", 0, 0)))
    p += [
        ("nat_range", (_JGE, "next", "reject", first)),
        (None, (_JGT, "reject", "accept", last)),
        ("fragment", (_LD_B_ABS, 0, 0, ETH_HDR_LEN + 9)),
        (None, (_JEQ, "accept", "next", 6)),
        (None, (_JEQ, "accept", "reject", 17)),
        ("accept", (_RET_K, 0, 0, 0x40000)),
        ("reject", (_RET_K, 0, 0, 0)),
    ]
    return assemble(p)


def reject_all() -> bytes:
    """A filter that accepts nothing: a socket waiting to join its fanout group."""
    return assemble([(None, (_RET_K, 0, 0, 0))])


def attach_filter(sock: socket.socket, program: bytes) -> None:
    count = len(program) // 8
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", count, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_packet_socket(
    interface: str,
    program: bytes,
    buffer_bytes: int = 32 << 20,
    rx_ring: RingSpec | None = None,
) -> socket.socket:
    """An AF_PACKET socket on `interface`, vnet headers on, filter attached before bind (so no
    unfiltered frame is ever queued), large buffers, and a receive ring if asked for (it must be
    set up before bind)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: no frames yet
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        for option, fallback in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, fallback, buffer_bytes)
        attach_filter(sock, program)
        if rx_ring is not None:
            from lbnat.dataplane.rings import setup_rx_ring  # rings imports this module

            setup_rx_ring(sock, rx_ring)
        sock.bind((interface, ETH_P_IP))
    except BaseException:
        sock.close()
        raise
    return sock
