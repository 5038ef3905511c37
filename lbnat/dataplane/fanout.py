"""PACKET_FANOUT: N worker sockets share one interface, and both directions of a flow reach the
same worker.

The kernel runs a classic BPF program per frame and hands the frame to socket number
`result % N` of the group (PACKET_FANOUT_CBPF). The program, `steering_program()`, reads the
headers (offsets from the IPv4 header: that is where the fanout hook sees the frame):
- to a port in the NAT range (a backend's reply): worker (port - first) // slice, because
  worker i allocates NAT ports only from its own slice of the range (`nat_slices()`);
- an ICMP error (from a backend, about a packet lbnat sent): the same rule on the quoted
  packet's source port, which is lbnat's NAT port;
- anything else (a client's packet to a virtual port): a hash of the client's address and port,
  so all of a client connection's packets reach the one worker that opened its row.
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

from lbnat.dataplane.bpf import NEXT, Insn, Line, Op, assemble, attach_fanout_program
from lbnat.dataplane.kernel import (
    PACKET_FANOUT,
    PACKET_FANOUT_CBPF,
    PACKET_FANOUT_FLAG_UNIQUEID,
    SOL_PACKET,
)
from lbnat.packet import ICMP, TCP, UDP

GOLDEN = 0x9E3779B1  # Fibonacci hashing: multiply, keep the high half


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
        # ICMP error: the quoted packet (after an option-less outer header) came from NAT port.
        ("icmp", Insn(Op.LD_B_ABS, k=0)),  # version and header length
        (None, Insn(Op.JEQ, NEXT, "zero", 0x45)),  # IPv4 without options: 20 bytes
        (None, Insn(Op.LDX_B_MSH, k=28)),  # X = the quoted header's length
        (None, Insn(Op.LD_H_IND, k=28)),  # the quoted packet's source port
        (None, Insn(Op.JGE, NEXT, "zero", first)),
        (None, Insn(Op.JGT, "zero", "nat", last)),
        ("nat", Insn(Op.SUB_K, k=first)),
        (None, Insn(Op.DIV_K, k=size)),
        (None, Insn(Op.RET_A)),
        ("zero", Insn(Op.RET_K, k=0)),
    ]
    return assemble(p)


def client_worker(client_ip: int, client_port: int, workers: int) -> int:
    """What the program computes for a client's packet (tests and `lbnat sessions` use it)."""
    return (((client_ip ^ client_port) * GOLDEN & 0xFFFFFFFF) >> 16) % workers


def join(socks: Sequence[socket.socket], program: bytes) -> int:
    """Put bound packet sockets into one new fanout group, in order, steered by `program`.
    Returns the group id (unique in the network namespace, chosen by the kernel)."""
    mode = (PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_UNIQUEID) << 16
    socks[0].setsockopt(SOL_PACKET, PACKET_FANOUT, mode)
    group = int(struct.unpack("<I", socks[0].getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0]) & 0xFFFF
    attach_fanout_program(socks[0], program)
    for sock in socks[1:]:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | (PACKET_FANOUT_CBPF << 16))
    return group
