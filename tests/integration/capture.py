"""Capture the TCP/UDP frames from one address arriving on a namespace's eth0, with their
virtio-net headers (PACKET_VNET_HDR: whether the checksum is still partial, whether it is a GSO
super-packet), and check every checksum as the receiving kernel would have to.

    python -m tests.integration.capture --source 198.18.0.2 --seconds 20 --limit 4000

stops after --seconds, --limit frames or a SIGTERM (the test's transfer is over), and prints one
JSON object: frames, partial, gso, and the first bad ones. A partial checksum is
completed first, as the kernel's skb_checksum_help does; the arithmetic is tests.unit.fixtures',
never lbnat.packet's. Runs inside the namespace (`ip netns exec`); bounded in frames and time.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import struct
import sys
import time

from tests.unit.fixtures import checksums_ok, complete_partial

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM = 1
ETH = 14


def check(frame: bytes) -> tuple[bool, bool, bool]:
    """(partial, gso, checksums right) of one captured frame, vnet header first."""
    flags, gso_type, _hdr_len, _gso_size, _start, _offset = VNET.unpack_from(frame)
    packet = frame[VNET.size + ETH :]
    partial = bool(flags & NEEDS_CSUM)
    if partial:
        packet = bytes(complete_partial(packet))
    return partial, gso_type != 0, checksums_ok(packet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="capture frames from this IPv4 address")
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--limit", type=int, default=4000, help="stop after this many frames")
    parser.add_argument("--ready", default="", help="a file to create once capturing")
    args = parser.parse_args(argv)
    source = socket.inet_aton(args.source)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((args.interface, ETH_P_ALL))
    if args.ready:
        open(args.ready, "w").close()
    summary: dict[str, object] = {"frames": 0, "partial": 0, "gso": 0, "bad": []}
    bad: list[str] = []
    frames = partial_frames = gso_frames = 0
    deadline = time.monotonic() + args.seconds
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # the data is in
    while not stop and frames < args.limit and (left := deadline - time.monotonic()) > 0:
        try:
            if not select.select([sock], [], [], min(left, 0.2))[0]:
                continue
        except InterruptedError:
            continue
        frame, address = sock.recvfrom(1 << 17)
        if address[2] == socket.PACKET_OUTGOING:
            continue
        packet = frame[VNET.size + ETH :]
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[12:16] != source:
            continue
        if packet[9] not in (6, 17):
            continue
        partial, gso, ok = check(frame)
        frames += 1
        partial_frames += partial
        gso_frames += gso
        if not ok and len(bad) < 5:
            bad.append(frame.hex())
    summary.update(frames=frames, partial=partial_frames, gso=gso_frames, bad=bad)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
