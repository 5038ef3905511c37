"""`syn`: a half-open check. The default for TCP services.

A SYN goes out from a raw socket; a SYN-ACK that acknowledges it means alive, a RST means
refused. The backend's application never sees a connection: accept() returns only after a
three-way handshake, and this one never completes. The LB host's kernel answers the SYN-ACK
with a RST by itself, because no socket of its own knows the connection (the local port is
held by a bound, unconnected socket only so nothing else takes it meanwhile). This is the fix
for the C++ guideline's complaint that health-check connections clutter the server's terminal.

An IPv6 backend gets the same probe from an AF_INET6 raw socket, which sends and receives
the TCP segment without its IPv6 header: the kernel fills in the checksum (IPV6_CHECKSUM) and
the source address, and the reply's source address comes from recvfrom.

Packet building and reply classification are pure functions; only `check` touches sockets.
"""

from __future__ import annotations

import ipaddress
import secrets
import select
import socket
import struct
import time

from lbnat.dataplane.bpf import NEXT, Insn, Line, Op, assemble, attach_filter
from lbnat.health.probe import ProbeResult, error_detail
from lbnat.packet import ACK, RST, SYN, TCP, parse, transport_checksum


def syn_segment(src: int, dst: int, sport: int, dport: int, isn: int) -> bytes:
    """A TCP SYN (header only, MSS option, correct checksum) for a raw IPPROTO_TCP socket."""
    header = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, isn, 0, 6 << 4, SYN, 64240, 0, 0)
        + b"\x02\x04\x05\xb4"  # MSS 1460
    )
    struct.pack_into("!H", header, 16, transport_checksum(src, dst, TCP, header))
    return bytes(header)


def classify(
    packet: bytes, backend: int, port: int, local_port: int, isn: int
) -> ProbeResult | None:
    """The verdict an IPv4 packet read from the raw socket gives, or None if it is not the
    answer to our SYN."""
    headers = parse(packet, 0, len(packet))
    if not isinstance(headers, tuple):
        return None
    proto, _, src, _, sport, dport, flags, _, ack, _, _ = headers
    if (proto, src, sport, dport) != (TCP, backend, port, local_port):
        return None
    if ack != (isn + 1) & 0xFFFFFFFF or not flags & ACK:
        return None  # not an answer to this SYN (a stale segment)
    if flags & RST:
        return ProbeResult(False, "connection refused")
    if flags & SYN:
        return ProbeResult(True, "syn-ack")
    return None


def classify_segment(segment: bytes, port: int, local_port: int, isn: int) -> ProbeResult | None:
    """The verdict a TCP segment (no IP header: an AF_INET6 raw socket's data) from the
    backend's address gives, or None if it is not the answer to our SYN."""
    if len(segment) < 20:
        return None
    sport, dport, _, ack, _, flags = struct.unpack_from("!HHIIBB", segment)
    if (sport, dport) != (port, local_port):
        return None
    if ack != (isn + 1) & 0xFFFFFFFF or not flags & ACK:
        return None
    if flags & RST:
        return ProbeResult(False, "connection refused")
    if flags & SYN:
        return ProbeResult(True, "syn-ack")
    return None


def reply_filter6(port: int, local_port: int) -> bytes:
    """cBPF for an AF_INET6 raw socket (data starts at the TCP header): only segments from
    the backend's port to our local port reach Python (the address is checked there)."""
    program: list[Line] = [
        (None, Insn(Op.LD_H_ABS, k=0)),  # source port
        (None, Insn(Op.JEQ, NEXT, "reject", port)),
        (None, Insn(Op.LD_H_ABS, k=2)),  # destination port
        (None, Insn(Op.JEQ, "accept", "reject", local_port)),
        ("accept", Insn(Op.RET_K, k=0xFFFF)),
        ("reject", Insn(Op.RET_K, k=0)),
    ]
    return assemble(program)


def reply_filter(backend: int, port: int, local_port: int) -> bytes:
    """cBPF for an AF_INET raw socket (data starts at the IP header): only TCP segments from
    backend:port to our local port reach Python."""
    program: list[Line] = [
        (None, Insn(Op.LD_W_ABS, k=12)),  # source address
        (None, Insn(Op.JEQ, NEXT, "reject", backend)),
        (None, Insn(Op.LDX_B_MSH, k=0)),  # X = IP header length
        (None, Insn(Op.LD_H_IND, k=0)),  # source port
        (None, Insn(Op.JEQ, NEXT, "reject", port)),
        (None, Insn(Op.LD_H_IND, k=2)),  # destination port
        (None, Insn(Op.JEQ, "accept", "reject", local_port)),
        ("accept", Insn(Op.RET_K, k=0xFFFF)),
        ("reject", Insn(Op.RET_K, k=0)),
    ]
    return assemble(program)


def _source_address(ip: str, port: int, family: socket.AddressFamily = socket.AF_INET) -> str:
    """The address the kernel's routing picks to reach ip (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((ip, port))
        address: str = probe.getsockname()[0]
        return address


class SynProbe:
    kind = "syn"

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        deadline = time.monotonic() + timeout
        if ":" in ip:
            return self._check6(ip, port, deadline)
        try:
            source = _source_address(ip, port)
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder,
                socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw,
            ):
                holder.bind((source, 0))  # an ephemeral port: outside the NAT range and guard
                local_port = holder.getsockname()[1]
                backend = int.from_bytes(socket.inet_aton(ip), "big")
                attach_filter(raw, reply_filter(backend, port, local_port))
                isn = secrets.randbits(32)
                src = int.from_bytes(socket.inet_aton(source), "big")
                raw.sendto(syn_segment(src, backend, local_port, port, isn), (ip, 0))
                while (left := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([raw], [], [], left)
                    if not readable:
                        break
                    verdict = classify(raw.recv(65535), backend, port, local_port, isn)
                    if verdict is not None:
                        return verdict
        except PermissionError:
            return ProbeResult(False, "the syn probe needs root (a raw socket)")
        except OSError as error:
            return ProbeResult(False, error_detail(error))
        return ProbeResult(False, "timeout")

    def _check6(self, ip: str, port: int, deadline: float) -> ProbeResult:
        try:
            source = _source_address(ip, port, socket.AF_INET6)
            backend = ipaddress.IPv6Address(ip)
            with (
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as holder,
                socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw,
            ):
                holder.bind((source, 0))
                local_port = holder.getsockname()[1]
                attach_filter(raw, reply_filter6(port, local_port))
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 16)  # TCP's checksum
                raw.bind((source, 0))
                isn = secrets.randbits(32)
                raw.sendto(syn_segment(0, 0, local_port, port, isn), (ip, 0))
                while (left := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([raw], [], [], left)
                    if not readable:
                        break
                    segment, sender = raw.recvfrom(65535)
                    if ipaddress.IPv6Address(sender[0].partition("%")[0]) != backend:
                        continue
                    verdict = classify_segment(segment, port, local_port, isn)
                    if verdict is not None:
                        return verdict
        except PermissionError:
            return ProbeResult(False, "the syn probe needs root (a raw socket)")
        except OSError as error:
            return ProbeResult(False, error_detail(error))
        return ProbeResult(False, "timeout")
