"""A classic BPF interpreter for the opcodes lbnat's programs use (socket filters, the probe
filter, the fanout steering program), so tests can run them over packets built with scapy,
without root or a socket."""

from __future__ import annotations

import struct


def run_bpf(program: bytes, frame: bytes) -> int:
    """Run `program` on `frame`; returns what it returns (a filter: the snap length; a fanout
    program: the socket index before the kernel's modulo)."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = 0
    pc = 0

    def load(offset: int, size: int) -> int | None:
        if offset < 0 or offset + size > len(frame):
            return None  # the kernel returns 0 (reject) on an out-of-bounds load
        value: int = int.from_bytes(frame[offset : offset + size], "big")
        return value

    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code in (0x20, 0x28, 0x30):  # ld w/h/b [k]
            value = load(k, {0x20: 4, 0x28: 2, 0x30: 1}[code])
            if value is None:
                return 0
            a = value
        elif code in (0x48, 0x50):  # ldh / ldb [x + k]
            value = load(x + k, 2 if code == 0x48 else 1)
            if value is None:
                return 0
            a = value
        elif code == 0xB1:  # ldxb 4 * ([k] & 0xf)
            value = load(k, 1)
            if value is None:
                return 0
            x = 4 * (value & 0x0F)
        elif code == 0x07:  # tax
            x = a
        elif code in (0x14, 0x24, 0x34, 0x74):  # sub / mul / div / rsh #k
            a = {0x14: a - k, 0x24: a * k, 0x34: a // k, 0x74: a >> k}[code] & 0xFFFFFFFF
        elif code == 0xAC:  # xor x
            a ^= x
        elif code == 0x05:  # ja
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):
            taken = {
                0x15: a == k,
                0x25: a > k,
                0x35: a >= k,
                0x45: bool(a & k),
            }[code]
            pc += jt if taken else jf
        elif code == 0x06:
            return int(k)
        elif code == 0x16:  # ret a
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
