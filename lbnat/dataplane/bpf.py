"""Classic BPF: the opcodes lbnat's programs use (`Op`), the instruction type, an assembler that
turns jump labels into the relative offsets the kernel wants, and attaching a program to a
socket.

Three programs are written with it: the packet socket's filter
(lbnat.dataplane.packet_socket.build_filter), the fanout group's steering program
(lbnat.dataplane.fanout.steering_program) and the SYN probe's reply filter
(lbnat.health.syn.reply_filter). Assembling is pure; only the attach functions touch a socket.

A program is a sequence of lines, `(label or None, Insn)`. A conditional jump's targets (`jt`
when the test holds, `jf` when not) are a label, NEXT, or an offset; the kernel counts offsets
from the instruction after the jump, forward only, in one byte. JA's target is `jt`; the
assembler puts its offset in `k`.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from lbnat.dataplane.kernel import PACKET_FANOUT_DATA, SO_ATTACH_FILTER, SOL_PACKET

# --- opcodes: class | size | mode, or class | operation | source (linux/bpf_common.h) ----------

BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
BPF_CLASS = 0x07  # the class bits of an opcode: BPF_CLASS(code) is code & 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10  # load sizes: 32, 16, 8 bits
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0  # load modes: [k], [x + k], 4 * ([k] & 0xf)
BPF_SUB, BPF_MUL, BPF_DIV, BPF_RSH, BPF_XOR = 0x10, 0x20, 0x30, 0x70, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08  # operand: the constant k, or the index register X
BPF_A = 0x10  # linux/filter.h: return the accumulator
BPF_TAX = 0x00  # linux/filter.h: X = A
BPF_MAXINSNS = 4096  # linux/bpf_common.h: the longest program the kernel takes


class Op(IntEnum):
    """The instructions lbnat's programs use (linux/filter.h's BPF_STMT and BPF_JUMP codes)."""

    LD_W_ABS = BPF_LD | BPF_W | BPF_ABS  # A = the 32-bit word at [k]
    LD_H_ABS = BPF_LD | BPF_H | BPF_ABS  # A = the 16-bit half-word at [k]
    LD_B_ABS = BPF_LD | BPF_B | BPF_ABS  # A = the byte at [k]
    LD_H_IND = BPF_LD | BPF_H | BPF_IND  # A = the 16-bit half-word at [X + k]
    LD_B_IND = BPF_LD | BPF_B | BPF_IND  # A = the byte at [X + k]
    LDX_B_MSH = BPF_LDX | BPF_B | BPF_MSH  # X = 4 * ([k] & 0xf): an IPv4 header's length
    SUB_K = BPF_ALU | BPF_SUB | BPF_K  # A -= k
    MUL_K = BPF_ALU | BPF_MUL | BPF_K  # A *= k (mod 2**32)
    DIV_K = BPF_ALU | BPF_DIV | BPF_K  # A //= k
    RSH_K = BPF_ALU | BPF_RSH | BPF_K  # A >>= k
    XOR_X = BPF_ALU | BPF_XOR | BPF_X  # A ^= X
    TAX = BPF_MISC | BPF_TAX  # X = A
    JA = BPF_JMP | BPF_JA  # jump k forward
    JEQ = BPF_JMP | BPF_JEQ | BPF_K  # A == k ? jt : jf
    JGT = BPF_JMP | BPF_JGT | BPF_K  # A > k ? jt : jf
    JGE = BPF_JMP | BPF_JGE | BPF_K  # A >= k ? jt : jf
    JSET = BPF_JMP | BPF_JSET | BPF_K  # A & k ? jt : jf
    RET_K = BPF_RET | BPF_K  # return k (a filter: bytes to keep, 0 drops; fanout: the socket)
    RET_A = BPF_RET | BPF_A  # return A


NEXT = "next"  # a jump target: the instruction after the jump (offset 0)

Target = str | int  # a label, NEXT, or an offset already counted


class Insn(NamedTuple):
    """One instruction (struct sock_filter) before assembly."""

    code: Op
    jt: Target = 0
    jf: Target = 0
    k: int = 0


Line = tuple[str | None, Insn]  # an instruction and the label it carries, if any

# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; } in host byte order.
SOCK_FILTER = struct.Struct("=HBBI")


class AssemblyError(ValueError):
    """A program the kernel would refuse or run wrongly: a bad label, a jump out of reach."""


def assemble(program: Sequence[Line]) -> bytes:
    """The program as the kernel takes it: labels resolved into forward offsets, each
    instruction packed as a struct sock_filter."""
    if not 0 < len(program) <= BPF_MAXINSNS:
        raise AssemblyError(f"a BPF program has 1 to {BPF_MAXINSNS} instructions: {len(program)}")
    labels: dict[str, int] = {}
    for index, (label, _) in enumerate(program):
        if label is None:
            continue
        if label == NEXT or label in labels:
            raise AssemblyError(f"BPF label {label!r} defined twice (instruction {index})")
        labels[label] = index
    out = bytearray()
    for index, (_, insn) in enumerate(program):
        code, jt, jf, k = insn
        if not 0 <= k <= 0xFFFFFFFF:
            raise AssemblyError(f"BPF instruction {index}: k {k} does not fit 32 bits")
        if code & BPF_CLASS != BPF_JMP:
            if jt != 0 or jf != 0:
                raise AssemblyError(f"BPF instruction {index} is not a jump but has targets")
            out += SOCK_FILTER.pack(code, 0, 0, k)
        elif code == Op.JA:
            if jf != 0 or k != 0:
                raise AssemblyError(f"BPF instruction {index}: JA takes its target in jt alone")
            out += SOCK_FILTER.pack(code, 0, 0, _offset(labels, index, jt, 0xFFFFFFFF))
        else:
            out += SOCK_FILTER.pack(
                code, _offset(labels, index, jt, 0xFF), _offset(labels, index, jf, 0xFF), k
            )
    if program[-1][1].code & BPF_CLASS != BPF_RET:
        raise AssemblyError("a BPF program must end with a return")
    return bytes(out)


def _offset(labels: dict[str, int], here: int, target: Target, widest: int) -> int:
    """How many instructions a jump at `here` skips to reach `target`."""
    if isinstance(target, int):
        distance = target
    elif target == NEXT:
        return 0
    elif target in labels:
        distance = labels[target] - here - 1
    else:
        raise AssemblyError(f"BPF instruction {here} jumps to an unknown label {target!r}")
    if not 0 <= distance <= widest:
        raise AssemblyError(
            f"BPF instruction {here} jumps to {target!r}, {distance} instructions on: "
            f"a jump reaches 0 to {widest} instructions forward"
        )
    return distance


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Make `program` the socket's filter (SO_ATTACH_FILTER): it sees every frame before the
    socket does and returns how many bytes to keep (0: the socket never sees it)."""
    _set_program(sock, socket.SOL_SOCKET, SO_ATTACH_FILTER, program)


def attach_fanout_program(sock: socket.socket, program: bytes) -> None:
    """Make `program` the steering program of the PACKET_FANOUT_CBPF group `sock` belongs to:
    it returns, per frame, which socket of the group gets it (modulo the group's size)."""
    _set_program(sock, SOL_PACKET, PACKET_FANOUT_DATA, program)


def _set_program(sock: socket.socket, level: int, option: int, program: bytes) -> None:
    if not program or len(program) % SOCK_FILTER.size:
        raise AssemblyError(f"{len(program)} bytes are not a whole number of BPF instructions")
    code = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }. The kernel copies
    # the instructions during setsockopt: `code` need only live until it returns.
    fprog = struct.pack("HP", len(program) // SOCK_FILTER.size, ctypes.addressof(code))
    sock.setsockopt(level, option, fprog)
