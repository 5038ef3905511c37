"""lbnat.dataplane.tcbpf in a namespace, for tests/integration/test_tcbpf_netns.py (root); run
there with `nsenter --net=/run/netns/NS` (not `ip netns exec`: it keeps the real mounts):

python -m tests.integration.tcbpftool hold DEVICE
    load the fast path, attach it to DEVICE's clsact ingress and print {"ifindex": N}; then
    obey lines on stdin: "detach" (prints {"detached": true} or {"error": reason}), "attach"
    (prints {"attached": true}); at end of input close the program (detaching) and exit.
python -m tests.integration.tcbpftool stale DEVICE
    detach_stale on DEVICE; prints {"removed": true|false}.
python -m tests.integration.tcbpftool relay DEVICE PEER
    load the fast path, attach it to DEVICE's clsact ingress and print {"ifindex": N,
    "peer_mac": hex} (PEER's MAC); then obey JSON lines on stdin: {"put6": [key hex, value
    hex]} puts an entry in the IPv6 map ({"put": true}); {"vnet": hex, "frame": hex} sends
    the frame out of PEER (a veth whose other end is DEVICE) with that virtio_net_hdr
    (PACKET_VNET_HDR: a partial checksum, GSO), so it arrives at DEVICE's ingress as the
    kernel made it, and prints the first frame PEER then receives whose Ethernet source is
    "02000000bb02" (the program's rewrite, redirected out of DEVICE), {"vnet": hex, "frame":
    hex}, or {"timeout": true} after 5 s. Used by tests/integration/test_tcbpf6_netns.py.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

from lbnat.dataplane import tcbpf


def say(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


def hold(device: str) -> None:
    ifindex = socket.if_nametoindex(device)
    with tcbpf.TcProgram.load(tcbpf.object_path(), 64) as program:
        program.attach(ifindex)
        say({"ifindex": ifindex})
        for line in sys.stdin:
            command = line.strip()
            try:
                if command == "detach":
                    program.detach()
                    say({"detached": True})
                elif command == "attach":
                    program.attach(ifindex)
                    say({"attached": True})
            except tcbpf.OffloadUnavailable as error:
                say({"error": str(error)})


RELAYED_FROM = bytes.fromhex("02000000bb02")  # the source MAC the tests' entries write
SOL_PACKET = 263  # <linux/socket.h>
PACKET_VNET_HDR = 15  # <linux/if_packet.h>
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def relay(device: str, peer: str) -> None:
    ifindex = socket.if_nametoindex(device)
    with tcbpf.TcProgram.load(tcbpf.object_path(), 64) as program:
        program.attach(ifindex)
        flows6 = tcbpf.FlowMap(program.map6_fd)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((peer, 0))
        say({"ifindex": ifindex, "peer_mac": sock.getsockname()[4].hex()})
        for line in sys.stdin:
            request = json.loads(line)
            if "put6" in request:
                key, value = (bytes.fromhex(text) for text in request["put6"])
                say({"put": flows6.put(key, value)})
                continue
            sock.send(bytes.fromhex(request["vnet"]) + bytes.fromhex(request["frame"]))
            say(received(sock))
        flows6.close()
        sock.close()


def received(sock: socket.socket) -> dict[str, object]:
    """The first frame in from the program's redirect (not one sent, not the kernel's own)."""
    deadline = time.monotonic() + 5.0
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, address = sock.recvfrom(1 << 17)
        frame = data[10:]
        if address[2] != PACKET_OUTGOING and frame[6:12] == RELAYED_FROM:
            return {"vnet": data[:10].hex(), "frame": frame.hex()}
    return {"timeout": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["hold", "stale", "relay"])
    parser.add_argument("device")
    parser.add_argument("peer", nargs="?", default="v1")
    args = parser.parse_args()
    if args.command == "hold":
        hold(args.device)
    elif args.command == "relay":
        relay(args.device, args.peer)
    else:
        say({"removed": tcbpf.detach_stale(socket.if_nametoindex(args.device))})


if __name__ == "__main__":
    main()
