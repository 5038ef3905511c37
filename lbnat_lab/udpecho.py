"""A UDP echo server for the lab: every datagram comes back prefixed with the server's name,
so a client can tell which backend answered; "HealthCheck" is answered "OK" (lbnat's udp probe).

    python -m lbnat_lab.udpecho --port 9000 --name b1 [--host 0.0.0.0] [--log-peers]

A --host with a ``:`` is IPv6 (``::`` takes IPv4 too). --log-peers: one line for the first
datagram of each peer (the first MAX_PEERS of them), "udp echo NAME: first datagram from
IP:PORT", so a test can see the source address the backend sees.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from types import FrameType

HEALTH_CHECK = b"HealthCheck"
MAX_PEERS = 1000


def answer(name: bytes, datagram: bytes) -> bytes:
    if datagram.strip() == HEALTH_CHECK:
        return b"OK\n"
    return b"[" + name + b"] " + datagram


def serve(host: str, port: int, name: str, log_peers: bool = False) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            print(f"udpecho: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)
            return 1
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(0.2)  # wake up to notice a signal
        print(f"udp echo {name} listening on {host}:{port}", flush=True)
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        label = name.encode()
        served = 0
        peers: set[object] = set()
        while not stopping:
            try:
                datagram, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                continue  # an ICMP error about an earlier reply: nothing to do
            if log_peers and peer not in peers and len(peers) < MAX_PEERS:
                peers.add(peer)
                print(f"udp echo {name}: first datagram from {peer[0]}:{peer[1]}", flush=True)
            try:
                sock.sendto(answer(label, datagram), peer)
                served += 1
            except OSError:
                pass
        print(f"udp echo {name} stopped after {served} datagrams", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbnat_lab.udpecho", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default=None, help="default: host:port")
    parser.add_argument(
        "--log-peers", action="store_true", help="log each peer's first datagram (its address)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"port {args.port} is out of range")
    return serve(args.host, args.port, args.name or f"{args.host}:{args.port}", args.log_peers)


if __name__ == "__main__":
    raise SystemExit(main())
