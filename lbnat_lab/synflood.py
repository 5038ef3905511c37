"""A bounded SYN flood for the lab: spoofed sources, one target (issue 16's fault case).

    python -m lbnat_lab.synflood --count 100000 --target 198.18.0.2:20000 \\
        --sources 198.19.0.0/16 [--rate 20000] [--max-seconds 60]

Every SYN has a random source address inside --sources, a random source port and ISN, and an
MSS option, as a scanner's would. Sources must lie inside 198.18.0.0/15 (RFC 2544's benchmark
range, the lab's): the flood is for network namespaces, never for a real network. It stops
after --count packets or --max-seconds, whichever comes first, and prints one line: what it
sent, in how long, at what rate.

The packets are built by hand (struct and one checksum per packet) before the clock starts and
sent through a raw socket with IP_HDRINCL: scapy builds and sends a few thousand packets a
second, too slow for 100,000.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import struct
import sys
import time
from collections.abc import Sequence

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
MAX_COUNT = 10_000_000
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHHBBH")  # header + an MSS option (kind 2, length 4)


def _checksum(data: bytes) -> int:
    total = int.from_bytes(data, "big") % 0xFFFF  # the one's complement sum (packet.ones_sum)
    return ~(total or (0xFFFF if any(data) else 0)) & 0xFFFF


def syn_packet(src: int, dst: int, sport: int, dport: int, isn: int) -> bytes:
    """An IPv4 SYN with an MSS option and correct checksums."""
    src_b, dst_b = src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    tcp = _TCP.pack(sport, dport, isn, 0, 6 << 4, 0x02, 64240, 0, 0, 2, 4, 1460)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    header = _IP.pack(0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src_b, dst_b)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + tcp


def build(
    count: int, target: tuple[str, int], sources: ipaddress.IPv4Network, seed: int
) -> list[bytes]:
    rng = random.Random(seed)
    first, size = int(sources.network_address), sources.num_addresses
    dst = int(ipaddress.IPv4Address(target[0]))
    return [
        syn_packet(first + rng.randrange(size), dst, rng.randrange(1024, 65536), target[1],
                   rng.getrandbits(32))
        for _ in range(count)
    ]  # fmt: skip


def flood(
    packets: Sequence[bytes], target: tuple[str, int], rate: float, max_seconds: float
) -> tuple[int, int, float]:
    """Send the packets (at most `rate` a second if rate > 0) until done or out of time.
    Returns (sent, refused by the kernel, seconds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sent = refused = 0
    address = (target[0], 0)
    start = time.monotonic()
    deadline = start + max_seconds
    batch = 64
    try:
        for at in range(0, len(packets), batch):
            now = time.monotonic()
            if now >= deadline:
                break
            if rate > 0:
                due = start + at / rate
                if due > now:
                    time.sleep(min(due - now, deadline - now))
            for packet in packets[at : at + batch]:
                try:
                    sock.sendto(packet, address)
                    sent += 1
                except OSError:  # ENOBUFS under load: counted, the flood goes on
                    refused += 1
    finally:
        sock.close()
    return sent, refused, time.monotonic() - start


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{number} is not a port")
    if address not in LAB_RANGE:
        raise argparse.ArgumentTypeError(f"{address} is outside the lab's {LAB_RANGE}")
    return str(address), number


def _sources(text: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network") from None
    if not network.subnet_of(LAB_RANGE):
        raise argparse.ArgumentTypeError(f"{network} is not inside the lab's {LAB_RANGE}")
    return network


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbnat_lab.synflood", description=__doc__)
    parser.add_argument("--count", type=int, required=True, help=f"SYNs to send (<= {MAX_COUNT})")
    parser.add_argument("--target", type=_target, required=True, help="IP:PORT")
    parser.add_argument("--sources", type=_sources, required=True, help="source network")
    parser.add_argument("--rate", type=float, default=0.0, help="packets a second (0: flat out)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop after this")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    if not 0 < args.count <= MAX_COUNT:
        parser.error(f"--count must be 1..{MAX_COUNT}")
    if not 0 < args.max_seconds <= 3600:
        parser.error("--max-seconds must be in (0, 3600]")
    packets = build(args.count, args.target, args.sources, args.seed)
    try:
        sent, refused, seconds = flood(packets, args.target, args.rate, args.max_seconds)
    except PermissionError:
        print("synflood: a raw socket needs root (CAP_NET_RAW)", file=sys.stderr)
        return 1
    host, port = args.target
    print(
        f"synflood: sent {sent} SYNs to {host}:{port} from {args.sources} in {seconds:.2f} s "
        f"({sent / seconds if seconds > 0 else 0:.0f}/s), {refused} refused by the kernel",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
