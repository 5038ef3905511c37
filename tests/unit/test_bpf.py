"""The classic BPF assembler: labels become the right forward offsets, a program the kernel would
refuse is a clear error, and the three programs lbnat builds assemble to the bytes they had
before the assembler moved to lbnat.dataplane.bpf (pinned below)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import pytest

from lbnat import addresses
from lbnat.dataplane.bpf import (
    BPF_MAXINSNS,
    NEXT,
    AssemblyError,
    Insn,
    Line,
    Op,
    assemble,
    attach_filter,
)
from lbnat.dataplane.fanout import steering_program, steering_program6
from lbnat.dataplane.packet_socket import build_filter, build_filter6, reject_all
from lbnat.health.syn import reply_filter
from tests.unit.conftest import HOST


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return list(struct.iter_unpack("=HBBI", program))


RET = (None, Insn(Op.RET_K, k=0))
LOAD = (None, Insn(Op.LD_W_ABS, k=12))


# --- opcodes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),  # the values of linux/filter.h's BPF_STMT/BPF_JUMP codes
    [
        ("LD_W_ABS", 0x20),
        ("LD_H_ABS", 0x28),
        ("LD_B_ABS", 0x30),
        ("LD_H_IND", 0x48),
        ("LD_B_IND", 0x50),
        ("LDX_B_MSH", 0xB1),
        ("SUB_K", 0x14),
        ("MUL_K", 0x24),
        ("DIV_K", 0x34),
        ("RSH_K", 0x74),
        ("XOR_X", 0xAC),
        ("TAX", 0x07),
        ("JA", 0x05),
        ("JEQ", 0x15),
        ("JGT", 0x25),
        ("JGE", 0x35),
        ("JSET", 0x45),
        ("RET_K", 0x06),
        ("RET_A", 0x16),
    ],
)
def test_opcodes_have_the_kernels_values(name: str, code: int) -> None:
    assert Op[name] == code


# --- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "program", "expected"),
    [
        (
            "NEXT is offset 0 on both sides",
            [LOAD, (None, Insn(Op.JEQ, NEXT, NEXT, 7)), RET],
            [(0x20, 0, 0, 12), (0x15, 0, 0, 7), (0x06, 0, 0, 0)],
        ),
        (
            "a label is counted from the instruction after the jump",
            [
                (None, Insn(Op.JEQ, "yes", "no", 1)),
                ("no", Insn(Op.RET_K, k=0)),
                ("yes", Insn(Op.RET_K, k=1)),
            ],
            [(0x15, 1, 0, 1), (0x06, 0, 0, 0), (0x06, 0, 0, 1)],
        ),
        (
            "labels and NEXT mixed, on JGT, JGE and JSET",
            [
                (None, Insn(Op.JGT, "end", NEXT, 9)),
                (None, Insn(Op.JGE, NEXT, "end", 3)),
                (None, Insn(Op.JSET, "end", "zero", 4)),
                ("zero", Insn(Op.RET_K, k=0)),
                ("end", Insn(Op.RET_A)),
            ],
            [(0x25, 3, 0, 9), (0x35, 0, 2, 3), (0x45, 1, 0, 4), (0x06, 0, 0, 0), (0x16, 0, 0, 0)],
        ),
        (
            "JA's offset goes into k, jt and jf stay 0",
            [(None, Insn(Op.JA, "end")), LOAD, LOAD, ("end", Insn(Op.RET_A))],
            [(0x05, 0, 0, 2), (0x20, 0, 0, 12), (0x20, 0, 0, 12), (0x16, 0, 0, 0)],
        ),
        (
            "an offset given as a number is kept",
            [(None, Insn(Op.JEQ, 1, 0, 5)), RET, RET],
            [(0x15, 1, 0, 5), (0x06, 0, 0, 0), (0x06, 0, 0, 0)],
        ),
        (
            "a conditional jump reaches 255 instructions on",
            [(None, Insn(Op.JEQ, "far", NEXT, 1)), *[LOAD] * 255, ("far", Insn(Op.RET_A))],
            [(0x15, 255, 0, 1), *[(0x20, 0, 0, 12)] * 255, (0x16, 0, 0, 0)],
        ),
        (
            "JA reaches further than 255",
            [(None, Insn(Op.JA, "far")), *[LOAD] * 300, ("far", Insn(Op.RET_A))],
            [(0x05, 0, 0, 300), *[(0x20, 0, 0, 12)] * 300, (0x16, 0, 0, 0)],
        ),
    ],
)
def test_labels_resolve_to_forward_offsets(
    description: str, program: list[Line], expected: list[tuple[int, int, int, int]]
) -> None:
    assert instructions(assemble(program)) == expected


@pytest.mark.parametrize(
    ("description", "program", "message"),
    [
        ("an unknown label", [(None, Insn(Op.JEQ, "nowhere", NEXT, 1)), RET], "unknown label"),
        (
            "a conditional jump 256 on",
            [(None, Insn(Op.JEQ, "far", NEXT, 1)), *[LOAD] * 256, ("far", Insn(Op.RET_A))],
            "256 instructions on",
        ),
        (
            "a jump backwards",
            [("top", Insn(Op.LD_B_ABS, k=0)), (None, Insn(Op.JEQ, "top", NEXT, 1)), RET],
            "-2 instructions on",
        ),
        ("JA backwards", [("top", Insn(Op.LD_B_ABS, k=0)), (None, Insn(Op.JA, "top")), RET], "-2"),
        ("a numeric offset too large", [(None, Insn(Op.JEQ, 256, 0, 1)), RET], "256"),
        ("a label defined twice", [("x", Insn(Op.LD_B_ABS, k=0)), ("x", Insn(Op.RET_A))], "twice"),
        ("a label called next", [("next", Insn(Op.RET_A))], "twice"),
        ("a load with a jump target", [(None, Insn(Op.LD_B_ABS, "end", 0, 1)), RET], "not a jump"),
        (
            "JA with a false target",
            [(None, Insn(Op.JA, NEXT, "end")), ("end", Insn(Op.RET_A))],
            "JA",
        ),
        ("JA with k", [(None, Insn(Op.JA, NEXT, 0, 4)), RET], "JA"),
        ("k beyond 32 bits", [(None, Insn(Op.RET_K, k=1 << 32))], "32 bits"),
        ("k negative", [(None, Insn(Op.RET_K, k=-1))], "32 bits"),
        ("an empty program", [], "1 to 4096"),
        ("a program too long", [LOAD] * BPF_MAXINSNS + [RET], "1 to 4096"),
        ("no return at the end", [RET, LOAD], "end with a return"),
    ],
)
def test_programs_the_kernel_would_refuse_are_errors(
    description: str, program: list[Line], message: str
) -> None:
    with pytest.raises(AssemblyError, match=message):
        assemble(program)


def test_the_longest_program_assembles() -> None:
    assert len(assemble([LOAD] * (BPF_MAXINSNS - 1) + [RET])) == 8 * BPF_MAXINSNS


# --- the programs lbnat builds, pinned -----------------------------------------------------------

LB = 0xC6120002  # 198.18.0.2
BACKEND = 0xC6120015  # 198.18.0.21
LB6 = addresses.parse("fd00::2")

# Little-endian struct sock_filter words, as the assembler in packet_socket.py produced them
# before it moved here.
PINNED = [
    (
        lambda: build_filter(LB, [20000, 80], [5353], (61000, 65535)),
        "280000000c0000001500001b00080000200000001e00000015000019020012c62800000014000000450013"
        "00ff3f00003000000017000000150006000600000015000a00110000001500001301000000b10000000e00"
        "0000500000000e00000015000f000300000015000e0f0b000000b10000000e0000004800000010000000"
        "15000b005000000015000a00204e00000500000004000000b10000000e00000048000000100000001500"
        "0600e914000005000000000000003500000548ee000025000403ffff000030000000170000001500010006"
        "000000150000011100000006000000000004000600000000000000",
    ),
    (
        lambda: build_filter(LB, [], [], (32768, 65535)),
        "280000000c0000001500001800080000200000001e00000015000016020012c62800000014000000450010"
        "00ff3f00003000000017000000150006000600000015000800110000001500001001000000b10000000e00"
        "0000500000000e00000015000c000300000015000b0c0b000000b10000000e0000004800000010000000"
        "0500000003000000b10000000e00000048000000100000000500000000000000350000050080000025000403"
        "ffff000030000000170000001500010006000000150000011100000006000000000004000600000000000000",
    ),
    (reject_all, "0600000000000000"),
    (
        lambda: steering_program((32768, 65535), 4),
        "30000000090000001500020006000000150001001100000015000d1d01000000280000000600000045001b00"
        "ff1f0000b1000000000000004800000002000000350000010080000025000014ffff00004800000000000000"
        "0700000000000000200000000c000000ac0000000000000024000000b179379e740000001000000016000000"
        "0000000030000000000000001500000e45000000b10000001c000000480000001c0000003500000100800000"
        "25000007ffff0000480000001e0000000700000000000000200000002c000000ac0000000000000024000000"
        "b179379e74000000100000001600000000000000140000000080000034000000002000001600000000000000"
        "0600000000000000",
    ),
    (
        lambda: steering_program((61000, 65535), 3),
        "30000000090000001500020006000000150001001100000015000d1d01000000280000000600000045001b00"
        "ff1f0000b10000000000000048000000020000003500000148ee000025000014ffff00004800000000000000"
        "0700000000000000200000000c000000ac0000000000000024000000b179379e740000001000000016000000"
        "0000000030000000000000001500000e45000000b10000001c000000480000001c0000003500000148ee0000"
        "25000007ffff0000480000001e0000000700000000000000200000002c000000ac0000000000000024000000"
        "b179379e740000001000000016000000000000001400000048ee000034000000e80500001600000000000000"
        "0600000000000000",
    ),
    (
        lambda: steering_program6((61000, 65535), 3),
        "3000000006000000150002000600000015000100110000001500132c3a000000280000002a00000035000001"
        "48ee000025000026ffff0000280000002800000007000000000000002000000008000000ac00000000000000"
        "0700000000000000200000000c000000ac0000000000000007000000000000002000000010000000ac000000"
        "0000000007000000000000002000000014000000ac0000000000000024000000b179379e7400000010000000"
        "1600000000000000300000002800000035000017010000002500160003000000280000005800000035000001"
        "48ee000025000010ffff0000280000005a00000007000000000000002000000048000000ac00000000000000"
        "0700000000000000200000004c000000ac0000000000000007000000000000002000000050000000ac000000"
        "0000000007000000000000002000000054000000ac0000000000000024000000b179379e7400000010000000"
        "16000000000000001400000048ee000034000000e805000016000000000000000600000000000000",
    ),
    (
        lambda: build_filter6(LB6, [20000, 80], [5353], (61000, 65535)),
        "280000000c0000001500001edd86000020000000260000001500001c000000fd200000002a0000001500001a"
        "00000000200000002e0000001500001800000000200000003200000015000016020000003000000014000000"
        "15000a000600000015000d0011000000150005003a000000150010000000000015000f002b00000015000e00"
        "2c00000015000d003c000000050000000d00000030000000360000003500000b0100000025000a0903000000"
        "2800000038000000150007005000000015000600204e00000500000003000000280000003800000015000300"
        "e914000005000000000000003500000248ee000025000100ffff000006000000000004000600000000000000",
    ),
    (
        lambda: reply_filter(BACKEND, 9000, 40000),
        "200000000c00000015000006150012c6b10000000000000048000000000000001500000328230000480000"
        "000200000015000001409c000006000000ffff00000600000000000000",
    ),
]


@pytest.mark.parametrize(("build", "pinned"), PINNED)
def test_lbnats_programs_assemble_to_the_pinned_bytes(
    build: Callable[[], bytes], pinned: str
) -> None:
    assert instructions(build()) == list(struct.iter_unpack("<HBBI", bytes.fromhex(pinned)))


# --- attaching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build for build, _ in PINNED])
@pytest.mark.usefixtures("private_netns")
def test_the_kernel_takes_lbnats_programs(build: Callable[[], bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        attach_filter(sock, build())  # EINVAL if the kernel's checker refused it


@pytest.mark.usefixtures("private_netns")
def test_an_attached_filter_decides_what_the_socket_sees() -> None:
    """On a UDP socket the filter sees the UDP header first: byte 8 is the payload's first."""
    keep_yes: list[Line] = [
        (None, Insn(Op.LD_B_ABS, k=8)),
        (None, Insn(Op.JEQ, "accept", "reject", ord("y"))),
        ("accept", Insn(Op.RET_K, k=0xFFFF)),
        ("reject", Insn(Op.RET_K, k=0)),
    ]
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind((HOST, 0))
        receiver.settimeout(2)
        attach_filter(receiver, assemble(keep_yes))
        for payload in (b"no", b"yes", b"nope", b"yes again"):
            sender.sendto(payload, receiver.getsockname())
        assert receiver.recv(100) == b"yes"
        assert receiver.recv(100) == b"yes again"


@pytest.mark.parametrize("program", [b"", b"\x06\x00\x00\x00"])
def test_attaching_bytes_that_are_not_instructions_is_an_error(program: bytes) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        pytest.raises(AssemblyError, match="whole number"),
    ):
        attach_filter(sock, program)
