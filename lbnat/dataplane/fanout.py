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
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from lbnat.dataplane.packet_socket import (
    _JEQ,
    _JGE,
    _JGT,
    _JSET,
    _LD_B_ABS,
    _LD_H_ABS,
    _LD_H_IND,
    _LD_W_ABS,
    _LDX_B_MSH,
    _RET_K,
    SOL_PACKET,
    Insn,
    assemble,
)

PACKET_FANOUT = 18
PACKET_FANOUT_DATA = 22
PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000

# Classic BPF ALU opcodes (linux/filter.h), beyond the loads, jumps and returns that
# packet_socket's filter uses.
_SUB_K = 0x14
_MUL_K = 0x24
_DIV_K = 0x34
_RSH_K = 0x74
_XOR_X = 0xAC
_TAX = 0x07
_RET_A = 0x16

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
    p: list[tuple[str | None, Insn]] = [
        (None, (_LD_B_ABS, 0, 0, 9)),  # protocol
        (None, (_JEQ, "l4", "next", 6)),
        (None, (_JEQ, "l4", "next", 17)),
        (None, (_JEQ, "icmp", "zero", 1)),
        # TCP or UDP: a non-first fragment has no ports (the worker drops it, any will do).
        ("l4", (_LD_H_ABS, 0, 0, 6)),
        (None, (_JSET, "zero", "next", 0x1FFF)),
        (None, (_LDX_B_MSH, 0, 0, 0)),  # X = IP header length
        (None, (_LD_H_IND, 0, 0, 2)),  # destination port
        (None, (_JGE, "next", "client", first)),
        (None, (_JGT, "client", "nat", last)),
        # To a virtual port: hash the client's address and port.
        ("client", (_LD_H_IND, 0, 0, 0)),  # source port
        (None, (_TAX, 0, 0, 0)),
        (None, (_LD_W_ABS, 0, 0, 12)),  # source address
        (None, (_XOR_X, 0, 0, 0)),
        (None, (_MUL_K, 0, 0, GOLDEN)),
        (None, (_RSH_K, 0, 0, 16)),
        (None, (_RET_A, 0, 0, 0)),
        # ICMP error: the quoted packet (after an option-less outer header) came from NAT port.
        ("icmp", (_LD_B_ABS, 0, 0, 0)),
        (None, (_JEQ, "next", "zero", 0x45)),
        (None, (_LDX_B_MSH, 0, 0, 28)),  # X = the quoted header's length
        (None, (_LD_H_IND, 0, 0, 28)),  # the quoted packet's source port
        (None, (_JGE, "next", "zero", first)),
        (None, (_JGT, "zero", "nat", last)),
        ("nat", (_SUB_K, 0, 0, first)),
        (None, (_DIV_K, 0, 0, size)),
        (None, (_RET_A, 0, 0, 0)),
        ("zero", (_RET_K, 0, 0, 0)),
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
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(code))
    socks[0].setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, fprog)
    for sock in socks[1:]:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | (PACKET_FANOUT_CBPF << 16))
    return group
