"""What lbnat's packet sockets see while their link goes down, comes up and goes away; run
inside the lab's lb namespace by tests/integration/test_link_netns.py (root):

python -m tests.integration.linktool loop rings|blocks|socket
    a packet loop on eth0 (a real engine, lbnat's sockets and rings): eth0 down, one receive
    (the socket reports the link's error), a send and a flush of the transmit ring, eth0 up,
    a send; then eth0 deleted, one receive and a send. Prints JSON: errno names, the loop's
    link errors and drops, the transmit ring's slots.
python -m tests.integration.linktool fanout WORKERS SENDER_NAMESPACE
    lbnat's worker sockets in their fanout group; a datagram to the first NAT port of every
    worker's slice, sent from SENDER_NAMESPACE, before and after eth0 goes down and up; prints
    JSON {"before": [socket index per slice], "after": [...]}.

Every wait is bounded; eth0 is always set up again (except by the deletion, which is last).
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import subprocess
import sys
import time

from lbnat.dataplane.fanout import nat_slices
from lbnat.dataplane.link import Neighbours, find_link
from lbnat.dataplane.loop import PacketLoop, RingLoop
from lbnat.dataplane.packet_socket import build_filter
from lbnat.dataplane.rings import RingSpec
from lbnat.dataplane.workers import open_worker_sockets
from lbnat.engine import Engine
from lbnat.service import Service

LB_IP = "198.18.0.2"
NAT_PORTS = (61000, 65535)
SETTLE = 0.3  # seconds for the kernel to hand a frame over (bounded; the checks are on bytes)


def link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "eth0", state], check=True, timeout=10)


def errno_of(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


def loop_case(io: str) -> dict[str, object]:
    lb = find_link(LB_IP, "eth0")
    engine = Engine(LB_IP, [Service("chat", "tcp", 20000)], NAT_PORTS)
    program = build_filter(lb.ip_int, [20000], [], NAT_PORTS)
    spec = RingSpec(rx="blocks" if io == "blocks" else "frames")
    io = "socket" if io == "socket" else "rings"
    sock = open_worker_sockets(lb, program, NAT_PORTS, 1, io, spec)[0]
    neighbours = Neighbours(lb)
    loop: PacketLoop
    if io == "rings":
        loop = RingLoop(engine, sock, neighbours, lambda events: None, spec)
    else:
        loop = PacketLoop(engine, sock, neighbours, lambda events: None)
    # vnet header, broadcast Ethernet, a minimal IPv4 header to nobody: only whether it leaves
    frame = bytes(10) + b"\xff" * 6 + lb.mac + b"\x08\x00" + b"\x45" + bytes(19)
    out: dict[str, object] = {}
    try:
        link("down")
        out["readable_when_down"] = bool(select_readable(sock))
        loop._receive(time.monotonic(), sock)  # the ENETDOWN the kernel reports once
        out["readable_after"] = bool(select_readable(sock))
        out["send_when_down"] = errno_of(lambda: sock.send(frame))
        loop._send(frame, sock)
        if isinstance(loop, RingLoop):
            loop.tx.put(frame)
            loop._flush()
            out["tx_marked_after_flush"] = sum(
                1 for i in range(loop.tx.count) if loop.tx.map[i * loop.tx.frame_size] == 1
            )
    finally:
        link("up")
    out["send_when_up"] = errno_of(lambda: sock.send(frame))
    subprocess.run(["ip", "link", "del", "eth0"], check=True, timeout=10)
    out["readable_when_gone"] = bool(select_readable(sock))
    loop._receive(time.monotonic(), sock)
    out["send_when_gone"] = errno_of(lambda: sock.send(frame))
    loop._send(frame, sock)
    if isinstance(loop, RingLoop):
        loop.tx.put(frame)
        loop._flush()
    out["link_errors"] = loop.link_errors
    out["drops"] = {reason.label: n for reason, n in engine.drops.items()}
    loop.close()
    neighbours.close()
    sock.close()
    return out


def select_readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], SETTLE)[0])


def fanout_case(workers: int, sender: str) -> dict[str, object]:
    lb = find_link(LB_IP, "eth0")
    program = build_filter(lb.ip_int, [20000], [9], NAT_PORTS)
    socks = open_worker_sockets(lb, program, NAT_PORTS, workers, "socket", RingSpec())
    ports = [first for first, _ in nat_slices(NAT_PORTS, workers)]
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"[s.sendto(b'probe', ('{LB_IP}', p)) for p in {ports!r}]"
    )

    def owners() -> list[int | None]:
        subprocess.run(
            ["ip", "netns", "exec", sender, sys.executable, "-c", send], check=True, timeout=10
        )
        time.sleep(SETTLE)
        seen: dict[int, int] = {}
        for index, sock in enumerate(socks):
            while True:
                try:
                    frame = sock.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:  # the link's error, once
                    continue
                ihl = (frame[10 + 14] & 0xF) * 4
                at = 10 + 14 + ihl + 2
                seen[int.from_bytes(frame[at : at + 2], "big")] = index
        return [seen.get(port) for port in ports]

    out: dict[str, object] = {"before": owners()}
    link("down")
    time.sleep(SETTLE)
    link("up")
    out["after"] = owners()
    for sock in socks:
        sock.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="linktool")
    sub = parser.add_subparsers(dest="case", required=True)
    sub.add_parser("loop").add_argument("io", choices=["rings", "blocks", "socket"])
    fan = sub.add_parser("fanout")
    fan.add_argument("workers", type=int)
    fan.add_argument("sender")
    args = parser.parse_args()
    result = loop_case(args.io) if args.case == "loop" else fanout_case(args.workers, args.sender)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
