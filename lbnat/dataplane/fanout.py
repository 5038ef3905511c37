"""PACKET_FANOUT: N worker sockets share one interface, and both directions of a flow reach the
same worker.

The kernel runs a classic BPF program per frame and hands the frame to socket number
`result % N` of the group (PACKET_FANOUT_CBPF). The program, `steering_program()`, reads the
headers (offsets from the IPv4 header: that is where the fanout hook sees the frame):
- to a port in the NAT range (a backend's reply): worker (port - first) // slice, because
  worker i allocates NAT ports only from its own slice of the range (`nat_slices()`);
- an ICMP error (from a backend's side, about a packet lbnat sent to a backend): the same rule
  on the quoted packet's source port, which is lbnat's NAT port;
- an ICMP error about a packet lbnat sent to a client (its quoted source is the VIP and a
  service port, outside the NAT range: a router's fragmentation-needed towards the VIP): a
  hash of the quoted destination address and port, the client's, as below;
- anything else (a client's packet to a virtual port): a hash of the client's address and port,
  so all of a client connection's packets reach the one worker that opened its row.

IPv6 (--ip6) has a group of its own (a group holds sockets of one protocol; the IPv6 sockets are
bound to ETH_P_IPV6), steered the same way by `steering_program6`: the same NAT-port slices, the
client's hash over its address folded to 32 bits (`client_worker`), ICMPv6 errors (types 1-3)
by their quote. It assumes no extension headers (the next header at offset 6, the transport
header at 40). A packet that has them goes to socket 0: with several workers, the odd packet of
a flow that carries a hop-by-hop, routing or destination-options header (or an IPv6 fragment,
which lbnat drops anyway) reaches worker 0, which has no row for it unless the flow is its own,
and drops it as it drops any packet of a flow it does not know (the sender retransmits).
Nothing is shared between workers: each owns its slice of the NAT ports and the rows it opened.

Group membership is an array in the kernel, in join order, compacted when a socket leaves. So
the main process opens every worker's socket, joins them in order and keeps them open: a worker
that dies leaves its socket (and its place in the group) behind, and its replacement inherits it.
A link flap unlinks every member and links them again in the order the sockets were *created*
(the kernel walks the namespace's packet-socket list): `join` must be given them in creation
order, as lbnat.dataplane.workers.open_worker_sockets does, or worker i loses slice i after the
first flap (tests/integration/test_link_netns.py).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from lbnat.addresses import V4_MAX
from lbnat.dataplane.bpf import NEXT, Insn, Line, Op, assemble, attach_fanout_program
from lbnat.dataplane.kernel import (
    PACKET_FANOUT,
    PACKET_FANOUT_CBPF,
    PACKET_FANOUT_FLAG_UNIQUEID,
    SOL_PACKET,
)
from lbnat.packet import ICMP, TCP, UDP

GOLDEN = 0x9E3779B1  # Fibonacci hashing: multiply, keep the high half
ICMPV6 = socket.IPPROTO_ICMPV6  # 58


def nat_slices(nat_ports: tuple[int, int], workers: int) -> list[tuple[int, int]]:
    """Worker i's share of the NAT port range: equal, contiguous, in order. The few ports left
    over at the top (when the range does not divide evenly) are not used."""
    first, last = nat_ports
    size = (last - first + 1) // workers
    if size < 1:
        raise ValueError(f"nat_ports {first}-{last} is too small for {workers} workers")
    return [(first + i * size, first + (i + 1) * size - 1) for i in range(workers)]


def steering_program(nat_ports: tuple[int, int], workers: int) -> bytes:
    """The fanout program for `workers` sockets (see the module docstring)."""
    first = nat_ports[0]
    size = nat_slices(nat_ports, workers)[0][1] - first + 1
    last = first + size * workers - 1
    p: list[Line] = [
        (None, Insn(Op.LD_B_ABS, k=9)),  # protocol
        (None, Insn(Op.JEQ, "l4", NEXT, TCP)),
        (None, Insn(Op.JEQ, "l4", NEXT, UDP)),
        (None, Insn(Op.JEQ, "icmp", "zero", ICMP)),
        # TCP or UDP: a non-first fragment has no ports (the worker drops it, any will do).
        ("l4", Insn(Op.LD_H_ABS, k=6)),  # flags + fragment offset
        (None, Insn(Op.JSET, "zero", NEXT, 0x1FFF)),  # the fragment offset
        (None, Insn(Op.LDX_B_MSH, k=0)),  # X = IP header length
        (None, Insn(Op.LD_H_IND, k=2)),  # destination port
        (None, Insn(Op.JGE, NEXT, "client", first)),
        (None, Insn(Op.JGT, "client", "nat", last)),
        # To a virtual port: hash the client's address and port.
        ("client", Insn(Op.LD_H_IND, k=0)),  # source port
        (None, Insn(Op.TAX)),
        (None, Insn(Op.LD_W_ABS, k=12)),  # source address
        (None, Insn(Op.XOR_X)),
        (None, Insn(Op.MUL_K, k=GOLDEN)),
        (None, Insn(Op.RSH_K, k=16)),
        (None, Insn(Op.RET_A)),
        # ICMP error (after an option-less outer header): a quote from a NAT port is about a
        # packet lbnat sent to a backend; any other, about one it sent to a client: that
        # client's worker, hash(quoted destination address, quoted destination port).
        ("icmp", Insn(Op.LD_B_ABS, k=0)),  # version and header length
        (None, Insn(Op.JEQ, NEXT, "zero", 0x45)),  # IPv4 without options: 20 bytes
        (None, Insn(Op.LDX_B_MSH, k=28)),  # X = the quoted header's length
        (None, Insn(Op.LD_H_IND, k=28)),  # the quoted packet's source port
        (None, Insn(Op.JGE, NEXT, "quoted_client", first)),
        (None, Insn(Op.JGT, "quoted_client", "nat", last)),
        ("quoted_client", Insn(Op.LD_H_IND, k=30)),  # the quoted destination port
        (None, Insn(Op.TAX)),
        (None, Insn(Op.LD_W_ABS, k=44)),  # the quoted destination address
        (None, Insn(Op.XOR_X)),
        (None, Insn(Op.MUL_K, k=GOLDEN)),
        (None, Insn(Op.RSH_K, k=16)),
        (None, Insn(Op.RET_A)),
        ("nat", Insn(Op.SUB_K, k=first)),
        (None, Insn(Op.DIV_K, k=size)),
        (None, Insn(Op.RET_A)),
        ("zero", Insn(Op.RET_K, k=0)),
    ]
    return assemble(p)


def _fold(at: int) -> list[Line]:
    """A = X ^ the four 32-bit words of the IPv6 address at offset `at`, XORed."""
    p: list[Line] = []
    for i in range(4):
        p.append((None, Insn(Op.LD_W_ABS, k=at + 4 * i)))
        p.append((None, Insn(Op.XOR_X)))
        if i < 3:
            p.append((None, Insn(Op.TAX)))
    return p


def steering_program6(nat_ports: tuple[int, int], workers: int) -> bytes:
    """The IPv6 group's fanout program (see the module docstring). Offsets are from the IPv6
    header, where the fanout hook sees the frame; no extension headers assumed."""
    first = nat_ports[0]
    size = nat_slices(nat_ports, workers)[0][1] - first + 1
    last = first + size * workers - 1
    hash_tail: list[Line] = [
        (None, Insn(Op.MUL_K, k=GOLDEN)),
        (None, Insn(Op.RSH_K, k=16)),
        (None, Insn(Op.RET_A)),
    ]
    p: list[Line] = [
        (None, Insn(Op.LD_B_ABS, k=6)),  # next header
        (None, Insn(Op.JEQ, "l4", NEXT, TCP)),
        (None, Insn(Op.JEQ, "l4", NEXT, UDP)),
        (None, Insn(Op.JEQ, "icmp", "zero", ICMPV6)),  # an extension header, or else: socket 0
        ("l4", Insn(Op.LD_H_ABS, k=42)),  # destination port
        (None, Insn(Op.JGE, NEXT, "client", first)),
        (None, Insn(Op.JGT, "client", "nat", last)),
        # To a virtual port: hash the client's address (folded to 32 bits) and port.
        ("client", Insn(Op.LD_H_ABS, k=40)),  # source port
        (None, Insn(Op.TAX)),
        *_fold(8),  # source address
        *hash_tail,
        # ICMPv6 error (types 1-3): the quoted IPv6 packet starts at 48, its ports at 88.
        ("icmp", Insn(Op.LD_B_ABS, k=40)),  # ICMPv6 type
        (None, Insn(Op.JGE, NEXT, "zero", 1)),
        (None, Insn(Op.JGT, "zero", NEXT, 3)),
        (None, Insn(Op.LD_H_ABS, k=88)),  # the quoted packet's source port
        (None, Insn(Op.JGE, NEXT, "quoted_client", first)),
        (None, Insn(Op.JGT, "quoted_client", "nat", last)),
        # About a packet lbnat sent to a client: that client's worker.
        ("quoted_client", Insn(Op.LD_H_ABS, k=90)),  # the quoted destination port
        (None, Insn(Op.TAX)),
        *_fold(72),  # the quoted destination address
        *hash_tail,
        ("nat", Insn(Op.SUB_K, k=first)),
        (None, Insn(Op.DIV_K, k=size)),
        (None, Insn(Op.RET_A)),
        ("zero", Insn(Op.RET_K, k=0)),
    ]
    return assemble(p)


def client_worker(client_ip: int, client_port: int, workers: int) -> int:
    """What the programs compute for a client's packet (tests and `lbnat sessions` use it):
    an IPv6 address (a flagged int, lbnat.addresses) is folded to 32 bits first, the XOR of
    its four words, as steering_program6 does."""
    if client_ip > V4_MAX:
        value = client_ip & ((1 << 128) - 1)
        client_ip = (value >> 96) ^ (value >> 64) ^ (value >> 32) ^ value
        client_ip &= 0xFFFFFFFF
    return (((client_ip ^ client_port) * GOLDEN & 0xFFFFFFFF) >> 16) % workers


def join(socks: Sequence[socket.socket], program: bytes) -> int:
    """Put bound packet sockets (all of one protocol) into one new fanout group, in order,
    steered by `program`. Returns the group id (unique in the network namespace, chosen by
    the kernel; the IPv4 and the IPv6 groups get one each)."""
    mode = (PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_UNIQUEID) << 16
    socks[0].setsockopt(SOL_PACKET, PACKET_FANOUT, mode)
    group = int(struct.unpack("<I", socks[0].getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0]) & 0xFFFF
    attach_fanout_program(socks[0], program)
    for sock in socks[1:]:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | (PACKET_FANOUT_CBPF << 16))
    return group
