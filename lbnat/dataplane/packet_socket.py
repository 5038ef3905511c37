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
(lbnat.dataplane.guard). It is also fed after tc ingress, so a frame the kernel fast path
redirected never reaches it (an ETH_P_ALL tap would see those too).

IPv6 (--ip6) has a packet socket of its own, bound to ETH_P_IPV6 for the same reasons, with
its own filter (`build_filter6`); a socket is bound to one protocol, and a fanout group takes
members of one protocol only (lbnat.dataplane.fanout).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from lbnat import addresses
from lbnat.dataplane.bpf import NEXT, Insn, Line, Op, assemble, attach_filter
from lbnat.dataplane.kernel import (
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_QDISC_BYPASS,
    PACKET_VNET_HDR,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_PACKET,
)
from lbnat.dataplane.rings import RingSpec, setup_rx_ring
from lbnat.packet import ICMP, ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED, TCP, UDP

ICMPV6 = socket.IPPROTO_ICMPV6  # 58
ICMPV6_ERRORS = (1, 2, 3)  # destination unreachable, packet too big, time exceeded
# Extension headers the filter lets through to the engine, which walks them to the transport
# header (and drops a fragment, counted): hop-by-hop, routing, fragment, destination options.
IPV6_EXTENSIONS = (
    socket.IPPROTO_HOPOPTS,
    socket.IPPROTO_ROUTING,
    socket.IPPROTO_FRAGMENT,
    socket.IPPROTO_DSTOPTS,
)

ACCEPT = 0x40000  # a filter's "keep this many bytes": all of a 64 KB GSO super-packet
REJECT = 0


def build_filter(
    lb_ip: int,
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    nat_ports: tuple[int, int],
    vip: int | None = None,
) -> bytes:
    """Accept IPv4 TCP/UDP to lb_ip (or the vip, when --vip sets one apart) whose destination
    port is a service port of its protocol or in the NAT range (either protocol); ICMP errors
    to them (they may be about a translated flow); IP fragments of TCP/UDP to them, so they
    are counted as drops. Everything else is left to the kernel and never copied to Python."""
    first, last = nat_ports
    ip = ETH_HLEN  # offsets below are from the frame's start: the IPv4 header follows Ethernet
    p: list[Line] = [
        (None, Insn(Op.LD_H_ABS, k=12)),  # ethertype
        (None, Insn(Op.JEQ, NEXT, "reject", ETH_P_IP)),
        (None, Insn(Op.LD_W_ABS, k=ip + 16)),  # destination address
    ]
    if vip is None or vip == lb_ip:
        p.append((None, Insn(Op.JEQ, NEXT, "reject", lb_ip)))
    else:
        p.append((None, Insn(Op.JEQ, "ours", NEXT, lb_ip)))
        p.append((None, Insn(Op.JEQ, NEXT, "reject", vip)))
    p += [
        ("ours", Insn(Op.LD_H_ABS, k=ip + 6)),  # flags + fragment offset
        (None, Insn(Op.JSET, "fragment", NEXT, 0x3FFF)),  # MF or an offset: a fragment
        (None, Insn(Op.LD_B_ABS, k=ip + 9)),  # protocol
        (None, Insn(Op.JEQ, "tcp", NEXT, TCP)),
        (None, Insn(Op.JEQ, "udp", NEXT, UDP)),
        (None, Insn(Op.JEQ, "icmp", "reject", ICMP)),
        # ICMP destination-unreachable and time-exceeded: maybe about a translated flow.
        ("icmp", Insn(Op.LDX_B_MSH, k=ip)),  # X = IP header length
        (None, Insn(Op.LD_B_IND, k=ip)),  # ICMP type
        (None, Insn(Op.JEQ, "accept", NEXT, ICMP_DEST_UNREACHABLE)),
        (None, Insn(Op.JEQ, "accept", "reject", ICMP_TIME_EXCEEDED)),
    ]
    for label, ports in (("tcp", sorted(set(tcp_ports))), ("udp", sorted(set(udp_ports)))):
        p.append((label, Insn(Op.LDX_B_MSH, k=ip)))  # X = IP header length
        p.append((None, Insn(Op.LD_H_IND, k=ip + 2)))  # destination port
        p.extend((None, Insn(Op.JEQ, "accept", NEXT, port)) for port in ports)
        p.append((None, Insn(Op.JA, "nat_range")))
    p += [
        ("nat_range", Insn(Op.JGE, NEXT, "reject", first)),
        (None, Insn(Op.JGT, "reject", "accept", last)),
        ("fragment", Insn(Op.LD_B_ABS, k=ip + 9)),  # protocol
        (None, Insn(Op.JEQ, "accept", NEXT, TCP)),
        (None, Insn(Op.JEQ, "accept", "reject", UDP)),
        ("accept", Insn(Op.RET_K, k=ACCEPT)),
        ("reject", Insn(Op.RET_K, k=REJECT)),
    ]
    return assemble(p)


def build_filter6(
    lb_ip6: int,
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    nat_ports: tuple[int, int],
) -> bytes:
    """The IPv6 socket's filter: accept IPv6 TCP/UDP to lb_ip6 (a flagged int,
    lbnat.addresses) whose destination port is a service port of its protocol or in the NAT
    range (either protocol); ICMPv6 errors to it (types 1-3: they may be about a translated
    flow); packets to it whose first next header is an extension header (the engine walks the
    chain: ports behind it cannot be read here; rare, and a packet that turns out not to be
    lbnat's is dropped by the engine while the kernel gets the original, as for everything
    else). Never neighbour discovery (ICMPv6 133-137) or any other ICMPv6: the kernel's."""
    first, last = nat_ports
    ip = ETH_HLEN  # offsets below are from the frame's start: the IPv6 header follows Ethernet
    l4 = ip + 40  # the transport header, right after a header without extensions
    words = [(addresses.packed(lb_ip6)[i : i + 4]) for i in range(0, 16, 4)]
    p: list[Line] = [
        (None, Insn(Op.LD_H_ABS, k=12)),  # ethertype
        (None, Insn(Op.JEQ, NEXT, "reject", ETH_P_IPV6)),
    ]
    for i, word in enumerate(words):  # destination address, a 32-bit word at a time
        p.append((None, Insn(Op.LD_W_ABS, k=ip + 24 + 4 * i)))
        p.append((None, Insn(Op.JEQ, NEXT, "reject", int.from_bytes(word, "big"))))
    p += [
        (None, Insn(Op.LD_B_ABS, k=ip + 6)),  # next header
        (None, Insn(Op.JEQ, "tcp", NEXT, TCP)),
        (None, Insn(Op.JEQ, "udp", NEXT, UDP)),
        (None, Insn(Op.JEQ, "icmp", NEXT, ICMPV6)),
    ]
    p.extend((None, Insn(Op.JEQ, "accept", NEXT, header)) for header in IPV6_EXTENSIONS)
    p += [
        (None, Insn(Op.JA, "reject")),
        # ICMPv6 errors only: never neighbour discovery (133-137), echo or the rest.
        ("icmp", Insn(Op.LD_B_ABS, k=l4)),  # ICMPv6 type
        (None, Insn(Op.JGE, NEXT, "reject", ICMPV6_ERRORS[0])),
        (None, Insn(Op.JGT, "reject", "accept", ICMPV6_ERRORS[-1])),
    ]
    for label, ports in (("tcp", sorted(set(tcp_ports))), ("udp", sorted(set(udp_ports)))):
        p.append((label, Insn(Op.LD_H_ABS, k=l4 + 2)))  # destination port
        p.extend((None, Insn(Op.JEQ, "accept", NEXT, port)) for port in ports)
        p.append((None, Insn(Op.JA, "nat_range")))
    p += [
        ("nat_range", Insn(Op.JGE, NEXT, "reject", first)),
        (None, Insn(Op.JGT, "reject", "accept", last)),
        ("accept", Insn(Op.RET_K, k=ACCEPT)),
        ("reject", Insn(Op.RET_K, k=REJECT)),
    ]
    return assemble(p)


def reject_all() -> bytes:
    """A filter that accepts nothing: a socket waiting to join its fanout group."""
    return assemble([(None, Insn(Op.RET_K, k=REJECT))])


def open_packet_socket(
    interface: str,
    program: bytes,
    buffer_bytes: int = 32 << 20,
    rx_ring: RingSpec | None = None,
    protocol: int = ETH_P_IP,
) -> socket.socket:
    """An AF_PACKET socket on `interface` for `protocol` (ETH_P_IP, or ETH_P_IPV6 for the
    IPv6 socket), vnet headers on, filter attached before bind (so no unfiltered frame is ever
    queued), large buffers, and a receive ring if asked for (it must be set up before bind)."""
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
            setup_rx_ring(sock, rx_ring)
        sock.bind((interface, protocol))
    except BaseException:
        sock.close()
        raise
    return sock
